"""Bad training input: unreadable images of every kind are skipped and counted, caption files in other
encodings and malformed metadata lines are errors naming file and line, a full disk during a checkpoint is a
clear error that loses nothing, and temporaries left by a killed save are cleaned and never resumed from."""

import codecs
import errno
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from sdlab.errors import CheckpointError, ParameterError
from sdlab.train.data import ImageFolderDataset, read_text_file, scan_folder


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
