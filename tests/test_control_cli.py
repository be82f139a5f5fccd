"""`sdlab generate --controlnet ...`: control units from the command line, run in-process on the tiny random
model; files or names in --controlnet-dir, preprocessors, several units, and the errors."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdlab.cli import main
from sdlab.config import TINY
from sdlab.control import save_controlnet
from sdlab.nn.controlnet import ControlNet, ControlNetConfig

BASE = ["--model", "random:tiny", "--steps", "3", "--size", "32x32", "-q", "--seed", "4", "--cfg", "3"]


def _run(capsys, *argv) -> tuple[int, list[str], str]:
    """(exit code, the paths printed, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if line], err


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = ControlNet(ControlNetConfig.for_unet(TINY.unet, embedding_channels=(8, 16)))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
        save_controlnet(net, root / f"edges{seed}")
    return root


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    image = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(image).ellipse((8, 6, 36, 32), fill="red", outline="black", width=3)
    path = tmp_path_factory.mktemp("images") / "picture.png"
    image.save(path)
    return path


def test_controlnet_by_path_and_by_name_steer_the_image(tmp_path, capsys, controlnet_dir, picture):
    _, plain, _ = _run(capsys, "generate", "a circle", *BASE, "--out", tmp_path)
    _, by_path, _ = _run(capsys, "generate", "a circle", *BASE, "--out", tmp_path, "--controlnet",
                      controlnet_dir / "edges1", "--control-image", picture, "--control-preprocessor", "canny")
    _, by_name, _ = _run(capsys, "generate", "a circle", *BASE, "--out", tmp_path, "--controlnet", "edges1",
                      "--controlnet-dir", controlnet_dir, "--control-image", picture, "--control-preprocessor", "canny")
    assert np.abs(_pixels(plain[0]) - _pixels(by_path[0])).max() > 10
    assert np.array_equal(_pixels(by_path[0]), _pixels(by_name[0]))


def test_two_units_with_per_unit_flags(tmp_path, capsys, controlnet_dir, picture):
    one = ["--controlnet", controlnet_dir / "edges1", "--control-image", picture]
    code, single, _ = _run(capsys, "generate", "a circle", *BASE, "--out", tmp_path, *one)
    code, both, _ = _run(capsys, "generate", "a circle", *BASE, "--out", tmp_path, *one, "--controlnet",
                      controlnet_dir / "edges2", "--control-image", picture, "--control-scale", 1.0,
                      "--control-scale", 0.5, "--control-end", 0.6, "--control-mode", "control")
    assert code == 0 and np.abs(_pixels(single[0]) - _pixels(both[0])).max() > 2


@pytest.mark.parametrize("extra, message", [
    (["--control-scale", "1", "--control-scale", "2", "--control-scale", "3"], "was given 3 times for 2"),
    (["--control-preprocessor", "openpose"], "annotator weights"),
    (["--control-mode", "loud"], "unknown control mode"),
], ids=["counts", "weighted preprocessor", "mode"])  # fmt: skip
def test_bad_control_flags_say_what_is_wrong(tmp_path, capsys, controlnet_dir, picture, extra, message):
    units = ["--controlnet", controlnet_dir / "edges1", "--controlnet", controlnet_dir / "edges2",
             "--control-image", picture]
    code, _, err = _run(capsys, "generate", "x", *BASE, "--out", tmp_path, *units, *extra)
    assert code != 0 and message in err
    assert not list(tmp_path.glob("*.png"))


def test_a_name_is_looked_up_in_the_folder_only(tmp_path, capsys, controlnet_dir, picture):
    for name, message in (("nothing", "nothing"), ("../edges1", "is not valid")):
        code, _, err = _run(capsys, "generate", "x", *BASE, "--out", tmp_path, "--controlnet", name,
                            "--controlnet-dir", controlnet_dir, "--control-image", picture)
        assert code != 0 and message in err
