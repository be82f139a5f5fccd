"""Bad input to the CLI: unreadable --from-png files and unwritable --out folders are one-line errors, given
before any model work, and a failed write leaves no partial or empty file behind."""

import errno
import os

import pytest
from PIL import Image

from sdlab import outputs
from sdlab.cli import main
from sdlab.pngmeta import MAX_INFOTEXT_CHARS, png_bytes, read_infotext

from test_pngmeta import unreadable_pngs

TINY = ["--model", "random:tiny", "--steps", "1", "--size", "32x32", "-q", "--seed", "1"]


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if a model is loaded: the errors below must come first."""
    from sdlab.model import Model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(Model, "from_name", refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- --from-png ----


def test_unreadable_from_png_is_a_one_line_error_naming_it(tmp_path, capsys, no_model_work):
    for path, message in unreadable_pngs(tmp_path):
        assert main(["generate", "--from-png", str(path), "--out", str(tmp_path / "out")]) == 2
        err = error_line(capsys)
        assert f"--from-png {path}: " in err and message in err and "SECRET" not in err


def test_from_png_with_an_oversized_infotext_is_refused(tmp_path, capsys, no_model_work):
    path = tmp_path / "long.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), "a" * (MAX_INFOTEXT_CHARS + 1)))
    assert main(["generate", "--from-png", str(path)]) == 2
    assert f"--from-png {path}: the PNG parameters text is" in error_line(capsys)


def test_unreadable_init_image_is_a_one_line_error(tmp_path, capsys, no_model_work):
    (tmp_path / "init.png").write_bytes(b"SECRET, not an image")
    assert main(["img2img", "x", "--init", str(tmp_path / "init.png"), "--out", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert f"--init {tmp_path / 'init.png'}: not an image file" in err and "SECRET" not in err


# ---- --out ----


def test_out_under_a_file_is_refused_before_any_model_work(tmp_path, capsys, no_model_work):
    (tmp_path / "taken").write_bytes(b"precious")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert main(["generate", "x", *TINY, "--out", str(out)]) == 2
        assert f"--out {out}: cannot be an output folder: {tmp_path / 'taken'} is a file" in error_line(capsys)
    assert (tmp_path / "taken").read_bytes() == b"precious"


def test_unwritable_out_is_refused_before_any_model_work(tmp_path, capsys, monkeypatch, no_model_work):
    # Tests run as root, which chmod does not stop: refuse the file creation itself, as a read-only folder does.
    def read_only(folder, name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outputs, "_create_temp", read_only)
    assert main(["generate", "x", *TINY, "--out", str(tmp_path / "out")]) == 2
    assert f"--out {tmp_path / 'out'}: cannot write files in this folder (Permission denied)" in error_line(capsys)
    assert main(["eval", "--model", "random:tiny", "--n", "1", "--out", str(tmp_path / "eval")]) == 2
    assert "cannot write files in this folder" in error_line(capsys)


def full_disk(monkeypatch):
    """Make every fsync fail as on a full disk (after the data went into the page cache)."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def test_a_full_disk_after_generation_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "00001-1.png").write_bytes(b"precious")
    full_disk(monkeypatch)
    assert main(["generate", "x", *TINY, "--out", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert f"{tmp_path}: writing 00002-1.png failed (No space left on device; free some space" in err
    assert [p.name for p in tmp_path.iterdir()] == ["00001-1.png"]  # no empty PNG, no temporary
    assert (tmp_path / "00001-1.png").read_bytes() == b"precious"


def test_images_written_before_the_disk_filled_are_reported(tmp_path, capsys, monkeypatch):
    calls, real_fsync = [], os.fsync

    def fail_second(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_second)
    assert main(["generate", "x", *TINY, "--batch", "2", "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "00001-1.png")] and "writing 00002-2.png failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-1.png"]
    assert read_infotext(tmp_path / "00001-1.png")


def test_save_png_never_replaces_and_cleans_up_without_hard_links(tmp_path, monkeypatch):
    image = Image.new("RGB", (4, 4))

    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # as on FAT or some network shares

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "00001-5.png").write_bytes(b"precious")
    assert outputs.save_png(image, tmp_path, seed=5, text="p") == tmp_path / "00002-5.png"
    taken = iter([tmp_path / "00001-5.png", tmp_path / "00002-5.png", tmp_path / "new.png"])
    assert outputs.write_new_file(b"data", taken) == tmp_path / "new.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-5.png", "00002-5.png", "new.png"]
    assert (tmp_path / "00001-5.png").read_bytes() == b"precious" and read_infotext(tmp_path / "00002-5.png") == "p"
    full_disk(monkeypatch)
    with pytest.raises(outputs.OutputError, match="No space left"):
        outputs.save_png(image, tmp_path, seed=5)
    assert len(list(tmp_path.iterdir())) == 3

