"""Bad training input: unreadable images of every kind are skipped and counted, caption files in other
encodings and malformed metadata lines are errors naming file and line, a full disk during a checkpoint is a
clear error that loses nothing, and temporaries left by a killed save are cleaned and never resumed from."""

import codecs
import errno
import io
import json
import os
import struct
import zlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sdlab.errors import CheckpointError, ParameterError
from sdlab.train.data import ImageFolderDataset, read_text_file, scan_folder
from sdlab.train.state import CheckpointManager


def write_image(path, size=(24, 16), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)


def encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 60).convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def bomb_png(width=20_000, height=20_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (over twice PIL's limit by default)."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return encoded("PNG")[:8] + ihdr + encoded("PNG")[33:]


# ---- images ----


def test_bombs_truncated_files_and_non_images_are_skipped_and_counted(tmp_path):
    write_image(tmp_path / "good.png")
    files = {
        "bomb.png": bomb_png(),
        "truncated.png": encoded("PNG")[:300],
        "truncated.jpg": encoded("JPEG")[:400],
        "truncated.webp": encoded("WEBP")[:200],
        "text.png": b"not an image",
        "empty.bmp": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for path in tmp_path.glob("*.*"):
        path.with_suffix(".txt").write_text("a caption")
    records, skipped = scan_folder(tmp_path)
    assert [r.path.name for r in records] == ["good.png"]
    assert dict(skipped.counts) == {"decompression bomb (more pixels than PIL's limit)": 1, "unreadable image": 5}
    assert skipped.total == 6


def test_an_image_that_breaks_after_the_scan_is_a_clear_error(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    data = ImageFolderDataset(tmp_path, 16)
    (tmp_path / "a.png").write_bytes(bomb_png())
    with pytest.raises(ParameterError, match="a.png: became unreadable during training$"):
        data.load(0)


# ---- caption encodings ----


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_caption_files_in_utf8_or_with_a_byte_order_mark_are_read(tmp_path, encoding):
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    lines = [{"file_name": "a.png", "text": "ein Kreis über einem Quadrat\u2028✓"}]
    (tmp_path / "metadata.jsonl").write_bytes(bom + "\r\n".join(json.dumps(l, ensure_ascii=False) for l in lines)
                                              .encode(encoding))
    write_image(tmp_path / "a.png")
    records, _ = scan_folder(tmp_path)
    assert records[0].caption == "ein Kreis über einem Quadrat\u2028✓"  # U+2028 does not end a JSON line
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "a.txt").write_bytes(bom + " eine Linie \n".encode(encoding))
    assert scan_folder(tmp_path)[0][0].caption == "eine Linie"


def test_latin1_captions_are_an_error_naming_file_and_line(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "fine"}\n'
                                              b'{"file_name": "b.png", "text": "caf\xe9 SECRET"}\n')
    with pytest.raises(ParameterError, match=r"metadata.jsonl, line 2: not valid UTF-8 text \(at byte 74 of") as error:
        scan_folder(tmp_path)
    assert "SECRET" not in str(error.value) and "caf" not in str(error.value)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "a.txt").write_bytes("une ligne\nune autre, très jolie".encode("latin-1"))
    with pytest.raises(ParameterError, match=r"a.txt, line 2: not valid UTF-8 text \(at byte 23 of"):
        scan_folder(tmp_path)
    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF16_LE + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(ParameterError, match=r"a.txt, line 1: not valid UTF-16 text"):
        read_text_file(tmp_path / "a.txt")


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "a.png", "text": "x"', "not valid JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('"SECRET"', "a JSON str, not an object"),
    ('{"file_name": "a.png", "text": null}', "'text' missing or not a string"),
    ('{"file_name": 3, "caption": "SECRET"}', "'file_name' and 'text' missing or not a string"),
    ("[" * 100_000, "JSON nested too deeply"),
], ids=["truncated", "list", "string", "null-text", "wrong-keys", "deep"])  # fmt: skip
def test_malformed_metadata_lines_are_errors_naming_file_and_line(tmp_path, line, message):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ParameterError, match=rf"metadata.jsonl, line 3: {message}") as error:
        scan_folder(tmp_path)
    assert "SECRET" not in str(error.value) and "\n" not in str(error.value)


# ---- checkpoints ----


def small_state(n=1000):
    return {"trained": {"w": torch.arange(float(n))}, "note": "x"}


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_that_loses_nothing(tmp_path, monkeypatch):
    from sdlab.train import state as state_module

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    manager.save(1, small_state())
    real_save = torch.save

    def disk_fills(obj, path):  # writes part of the file, then fails as torch does on a full disk
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\nmore")

    monkeypatch.setattr(torch, "save", disk_fills)
    monkeypatch.setattr(state_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=1024))
    with pytest.raises(CheckpointError) as error:
        manager.save(2, small_state())
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'checkpoints'}: no room to save step-00000002.pt: it needs about ")
    assert "0.0 MB are free; free some space and resume (step-00000001.pt and older checkpoints are intact)" in message
    assert "\n" not in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]  # no temporary left
    monkeypatch.setattr(torch, "save", real_save)
    assert manager.load(manager.latest())["step"] == 1

    def enospc(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", enospc)
    monkeypatch.setattr(state_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=10**11))
    with pytest.raises(CheckpointError, match="no room to save step-00000003.pt"):
        manager.save(3, small_state())  # plenty free now, yet the write said ENOSPC (e.g. a quota)


def test_other_save_failures_name_the_folder_and_keep_the_checkpoints(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    manager.save(1, small_state())

    def broken(obj, path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match=r"could not save step-00000002.pt \(Input/output error\); step-0000"):
        manager.save(2, small_state())


def test_stale_temporaries_are_removed_at_start_and_never_resumed_from(tmp_path):
    from sdlab.train import TrainConfig, Trainer

    folder = tmp_path / "images"
    for i in range(2):
        write_image(folder / f"{i}.png", size=(16, 16))
        (folder / f"{i}.txt").write_text("a red square")
    config = dict(model="tiny", data=str(folder), resolution=16, batch_size=2, save_every=0, progress_bar=False,
                  export_layouts=(), output_dir=str(tmp_path / "run"))
    Trainer(TrainConfig(steps=1, **config)).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    stale = [".step-00000005.pt.k2j_9x0a.tmp", ".step-00000009.pt.zzzzzzzz.tmp"]  # newer steps than the real one
    others = [".step-00000005.pt.tmp", "step-00000005.pt.abc.tmp", ".notes.tmp", "notes.txt"]  # not ours
    for name in stale + others:
        (checkpoints / name).write_bytes(b"\0" * 10)
    manager = CheckpointManager(checkpoints, keep_last=3)
    assert manager.latest().name == "step-00000001.pt"  # temporaries are never candidates for a resume
    resumed = Trainer(TrainConfig(steps=2, **config))
    assert resumed.step == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(others + ["step-00000001.pt"])
