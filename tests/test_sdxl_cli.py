"""`sdlab generate` on SDXL from the command line (in-process, tiny SDXL base and refiner folders and a single
file, 64x64, 2 steps): PNGs carry A1111's infotext and re-create themselves through `--from-png`; the size,
crop and aesthetic-score conditions (`--original-size WxH`, `--target-size WxH`, `--crop-top-left TOP,LEFT`,
their `--negative-*` forms, `--aesthetic-score`) reach the model as the Python API's fields do, are written
as sdlab's own infotext keys (A1111 has none for them) and read back."""

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.cli import main
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.fingerprint import sha256_file
from sdlab.lora import inject_lora
from sdlab.pngmeta import parse_infotext, png_info, read_infotext
from sdlab.params import GenerationParams

COMMON = ["--size", "64x64", "--steps", "2", "--seed", "3", "-q"]
CONDITIONS = ["--original-size", "128x96", "--crop-top-left", "8,16", "--target-size", "64x32",
              "--negative-original-size", "32x48"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cli")
    torch.manual_seed(0)
    base = sdlab.Model.build(TINY_SDXL)
    base.save(root / "base")
    base.save(root / "base.safetensors", layout="single-file")
    torch.manual_seed(1)
    sdlab.Model.build(TINY_SDXL_REFINER).save(root / "refiner")
    return root


def run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().out.splitlines() if line]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def fields(path) -> dict[str, str]:
    return parse_infotext(read_infotext(path)).fields


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    """An image of the base with the default conditions: its PNG's path."""
    code, (path,) = run_quietly("generate", "a red circle", "--negative", "blurry", "--model", models / "base",
                                *COMMON, "--out", tmp_path_factory.mktemp("plain"))
    assert code == 0
    return path


def run_quietly(*argv) -> tuple[int, list[str]]:
    """`run` for fixtures (no capsys there): the printed paths are the files written, newest last."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, [line for line in out.getvalue().splitlines() if line]


def test_generate_on_an_sdxl_folder_and_from_its_png(models, plain, tmp_path, capsys):
    assert plain.endswith("00001-3.png")
    f = fields(plain)
    assert (f["Size"], f["Steps"], f["Seed"], f["CFG scale"], f["Model"]) == ("64x64", "2", "3", "5", "base")
    assert parse_infotext(read_infotext(plain)).negative_prompt == "blurry"
    assert not {"Original size", "Crop top-left", "Target size", "Aesthetic score"} & set(f)  # defaults: not written
    image = pixels(plain)
    assert image.std() > 5
    code, (again,) = run(capsys, "generate", "--from-png", plain, "--model", models / "base", "-q", "--out", tmp_path)
    assert code == 0 and np.array_equal(pixels(again), image) and fields(again) == f


def test_an_sdxl_single_file_records_its_hash(models, tmp_path, capsys):
    file = models / "base.safetensors"
    code, (path,) = run(capsys, "generate", "a red circle", "--model", file, *COMMON, "--out", tmp_path)
    assert code == 0 and fields(path)["Model hash"] == sha256_file(file)[:10]


def test_size_and_crop_conditions_reach_the_model_and_round_trip(models, plain, tmp_path, capsys):
    code, (path,) = run(capsys, "generate", "a red circle", "--negative", "blurry", "--model", models / "base",
                        *COMMON, *CONDITIONS, "--out", tmp_path)
    assert code == 0
    f = fields(path)
    assert (f["Original size"], f["Crop top-left"], f["Target size"], f["Negative original size"]) == (
        "128x96", "8,16", "64x32", "32x48")
    assert "Negative target size" not in f and "Negative crop top-left" not in f
    image = pixels(path)
    assert np.abs(image - pixels(plain)).max() > 0  # the conditions change the picture
    # the flags mean the Python API's (height, width) and (top, left) fields
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=2, seed=3,
                              original_size=(96, 128),
                              crops_coords_top_left=(8, 16), target_size=(32, 64), negative_original_size=(48, 32))
    model = sdlab.load(models / "base")
    assert np.array_equal(np.asarray(sdlab.generate(model, params).images[0], dtype=np.int16), image)
    _, (again,) = run(capsys, "generate", "--from-png", path, "--model", models / "base", "-q", "--out", tmp_path)
    assert np.array_equal(pixels(again), image) and fields(again) == f
    # a flag given with --from-png overrides the PNG's value
    _, (changed,) = run(capsys, "generate", "--from-png", path, "--model", models / "base", "-q",
                        "--crop-top-left", "0,0", "--out", tmp_path)
    assert "Crop top-left" not in fields(changed) and fields(changed)["Original size"] == "128x96"


def test_the_refiner_takes_an_aesthetic_score(models, tmp_path, capsys):
    refiner = ["--model", models / "refiner", *COMMON, "--out", tmp_path]
    _, (plain,) = run(capsys, "generate", "a red circle", *refiner)
    code, (path,) = run(capsys, "generate", "a red circle", *refiner, "--aesthetic-score", "8",
                        "--negative-aesthetic-score", "1.5")
    assert code == 0
    f = fields(path)
    assert (f["Aesthetic score"], f["Negative aesthetic score"]) == ("8", "1.5")
    assert np.abs(pixels(path) - pixels(plain)).max() > 0
    _, (again,) = run(capsys, "generate", "--from-png", path, "--model", models / "refiner", "-q", "--out", tmp_path)
    assert np.array_equal(pixels(again), pixels(path))


@pytest.mark.parametrize("flag, value, match", [
    ("--original-size", "128", "is not WIDTHxHEIGHT"),
    ("--target-size", "0x64", "target_size"),
    ("--crop-top-left", "8x16", "is not TOP,LEFT"),
    ("--negative-crop-top-left", "0;1", "is not TOP,LEFT"),
    ("--aesthetic-score", "11", "aesthetic_score"),
])  # fmt: skip
def test_bad_condition_values_are_clear_errors(models, tmp_path, capsys, flag, value, match):
    try:
        code = main(["generate", "x", "--model", str(models / "base"), *COMMON, flag, value, "--out", str(tmp_path)])
    except SystemExit as e:  # argparse: a value of the wrong form
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and (flag in err or "error:" in err)
    assert not list(tmp_path.glob("*.png"))


def test_a_bad_condition_in_a_png_names_the_file_and_key(models, plain, tmp_path, capsys):
    path = plain
    text = read_infotext(path).replace("Version:", "Original size: big, Version:")
    bad = tmp_path / "bad.png"
    Image.open(path).save(bad, pnginfo=png_info(text))
    assert main(["generate", "--from-png", str(bad), "--model", str(models / "base"), "-q", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Original size (not WIDTHxHEIGHT)" in err


def test_a_lora_tag_on_sdxl_finds_its_file_in_the_lora_dir(models, plain, tmp_path, capsys):
    """A kohya file (lora_unet_ / lora_te1_ / lora_te2_, as sdlab's LoRA training writes it) named by a
    <lora:name:w> tag: the same image as GenerationParams.loras with that file, not the plain one."""
    model = sdlab.load(models / "base")
    network = inject_lora(model, rank=4, text_encoder=True)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(0, 0.3)  # a fresh adapter is zero: give it an effect
    assert {name.split("_")[1] for name in network.adapters} == {"unet", "te1", "te2"}
    network.save(tmp_path / "loras" / "style.safetensors")
    network.detach()
    code, (path,) = run(capsys, "generate", "a red circle <lora:style:0.8>", "--negative", "blurry", "--model",
                        models / "base", *COMMON, "--lora-dir", tmp_path / "loras", "--out", tmp_path / "out")
    assert code == 0
    image = pixels(path)
    assert np.abs(image - pixels(plain)).max() > 10
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=2, seed=3,
                              loras=((str(tmp_path / "loras" / "style.safetensors"), 0.8),))
    assert np.array_equal(np.asarray(sdlab.generate(model, params).images[0], dtype=np.int16), image)


def test_refiner_flags_equal_the_python_api(models, tmp_path, capsys):
    """`--refiner MODEL --refiner-switch-at F` finishes the image with the refiner, as
    `generate(..., refiner=...)`; the PNG says so as A1111 writes it, and --from-png asks for the refiner."""
    code, (path,) = run(capsys, "generate", "a red circle", "--model", models / "base", "--refiner",
                        models / "refiner", "--refiner-switch-at", "0.5", *COMMON, "--out", tmp_path / "a")
    assert code == 0
    meta = fields(path)
    assert meta["Refiner"].startswith("refiner [") and meta["Refiner switch at"] == "0.5"
    base, refiner = sdlab.Model.load(models / "base"), sdlab.Model.load(models / "refiner")
    params = GenerationParams(prompt="a red circle", width=64, height=64, steps=2, seed=3, refiner_switch_at=0.5)
    expected = np.asarray(sdlab.generate(base, params, refiner=refiner).images[0], dtype=np.int16)
    assert np.array_equal(pixels(path), expected)
    code, (again,) = run(capsys, "generate", "--from-png", path, "--model", models / "base", "--refiner",
                         models / "refiner", "-q", "--out", tmp_path / "b")
    assert code == 0 and np.array_equal(pixels(again), expected)
