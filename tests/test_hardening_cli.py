"""Bad input to the CLI: unreadable --from-png files and unwritable --out folders are one-line errors, given
before any model work, and a failed write leaves no partial or empty file behind."""

import errno
import os

import pytest
from PIL import Image

from sdlab import outputs
from sdlab.cli import main
from sdlab.errors import ParameterError
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
