"""The `sdlab` command line, run in-process on the tiny random model (32x32 images, 2 steps)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab import Model
from sdlab.cli import main
from sdlab.fingerprint import sha256_file
from sdlab.pngmeta import parse_infotext, read_infotext

TINY = ["--model", "random:tiny", "--steps", "2", "--size", "32x32", "-q"]


def run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, [line for line in out.splitlines() if line]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_numbered_pngs_with_a1111_metadata(tmp_path, capsys):
    code, paths = run(capsys, "generate", "a red circle", *TINY, "--seed", 7, "--batch", 2, "--cfg", 5,
                      "--negative", "blue", "--sampler", "Euler", "--out", tmp_path)
    assert code == 0
    assert [p.split("/")[-1] for p in paths] == ["00001-7.png", "00002-8.png"]
    info = parse_infotext(read_infotext(paths[1]))
    assert (info.prompt, info.negative_prompt) == ("a red circle", "blue")
    f = info.fields
    assert (f["Steps"], f["Sampler"], f["Schedule type"], f["CFG scale"], f["Seed"], f["Size"]) == (
        "2", "Euler", "Karras", "5", "8", "32x32")
    assert f["Model"] == "random:tiny" and len(f["Model hash"]) == 10


def test_never_overwrites(tmp_path, capsys):
    (tmp_path / "00001-3.png").write_bytes(b"precious")
    _, first = run(capsys, "generate", "x", *TINY, "--seed", 3, "--out", tmp_path)
    _, second = run(capsys, "generate", "x", *TINY, "--seed", 3, "--out", tmp_path)
    assert (tmp_path / "00001-3.png").read_bytes() == b"precious"
    assert first[0].endswith("00002-3.png") and second[0].endswith("00003-3.png")
    assert np.array_equal(pixels(first[0]), pixels(second[0]))  # same seed, same image


def test_from_png_recreates_the_same_pixels(tmp_path, capsys):
    _, made = run(capsys, "generate", "a green star", *TINY, "--seed", 11, "--sampler", "Euler a",
                  "--schedule", "exponential", "--out", tmp_path / "a")
    _, again = run(capsys, "generate", "--from-png", made[0], "-q", "--out", tmp_path / "b")
    assert np.array_equal(pixels(made[0]), pixels(again[0]))
    assert read_infotext(made[0]) == read_infotext(again[0])
    # flags given with --from-png override the PNG's values
    _, other = run(capsys, "generate", "--from-png", made[0], "--seed", 12, "-q", "--out", tmp_path / "c")
    assert parse_infotext(read_infotext(other[0])).fields["Seed"] == "12"
    assert not np.array_equal(pixels(made[0]), pixels(other[0]))


def test_from_png_without_metadata_is_a_clear_error(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png")]) == 2
    assert "no 'parameters' text chunk" in capsys.readouterr().err


def test_save_steps_gif_and_grid(tmp_path, capsys):
    _, paths = run(capsys, "generate", "x", *TINY[:2], "--steps", 3, "--size", "32x32", "-q", "--seed", 1,
                   "--batch", 2, "--save-steps", "gif", "--out", tmp_path)
    gif = Image.open(paths[-1])
    assert paths[-1].endswith("00001-1-steps.gif") and gif.n_frames == 3 and gif.size == (64, 32)
    gif.seek(2)  # the last frame is the final x0 estimate: the images themselves
    final = np.asarray(gif.convert("RGB"))[:, :32].astype(int)
    assert np.abs(final - pixels(paths[0]).astype(int)).mean() < 12  # GIF palette quantisation
    _, paths = run(capsys, "generate", "x", *TINY, "--seed", 1, "--save-steps", "grid", "--out", tmp_path)
    assert Image.open(paths[-1]).size == (2 * 32, 32)  # one row, one column per step


def test_img2img_and_inpaint(tmp_path, capsys):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(tmp_path / "mask.png")
    _, paths = run(capsys, "img2img", "x", *TINY, "--init", tmp_path / "init.png", "--strength", 0.5,
                   "--seed", 1, "--out", tmp_path)
    assert parse_infotext(read_infotext(paths[0])).fields["Denoising strength"] == "0.5"
    _, again = run(capsys, "img2img", "--from-png", paths[0], "--init", tmp_path / "init.png", "-q",
                   "--out", tmp_path / "again")
    assert np.array_equal(pixels(paths[0]), pixels(again[0]))
    _, paths = run(capsys, "inpaint", "x", "--model", "random:tiny", "--steps", 2, "-q", "--seed", 1,
                   "--init", tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--out", tmp_path)
    assert Image.open(paths[0]).size == (32, 32)
    assert parse_infotext(read_infotext(paths[0])).fields["Denoising strength"] == "0.75"


def test_bad_flags_give_clear_errors(tmp_path, capsys):
    assert main(["generate", "x", "--model", "random:tiny", "--size", "30x32", "--out", str(tmp_path)]) == 2
    assert "width=30 is not a multiple of 8" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "random:tiny", "--sampler", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown sampler 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "random:nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_builtin_model_missing_is_explained(tmp_path, capsys, monkeypatch):
    from sdlab import model as model_module
    from sdlab.errors import CheckpointError

    def missing():
        raise CheckpointError("the built-in model is not in this installation")

    monkeypatch.setattr(model_module, "builtin_model_path", missing)
    assert main(["generate", "x", "--out", str(tmp_path)]) == 2
    assert "built-in model is not in this installation" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Model.from_name("random:tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model.save(path, layout="single-file")
    return path, model


def test_info_describes_a_checkpoint(tiny_file, capsys):
    path, model = tiny_file
    code, lines = run(capsys, "info", path, "--json")
    info = json.loads("\n".join(lines))
    assert code == 0 and info["layout"] == "single-file" and info["prediction"] == "epsilon"
    assert info["parameters"]["unet"] == sum(p.numel() for p in model.unet.parameters())
    assert info["parameters"]["text_encoder"] == sum(p.numel() for p in model.text_encoder.parameters())
    assert info["dtypes"]["unet"] == {"float32": len(model.unet.state_dict())}
    assert info["sha256"] == sha256_file(path) and info["hash"] == info["sha256"][:10]
    _, text = run(capsys, "info", path)
    assert any(line.startswith("sha256:") for line in text)


def test_convert_to_fp16_diffusers_and_back(tiny_file, tmp_path, capsys):
    path, _ = tiny_file
    assert run(capsys, "convert", path, tmp_path / "folder", "--dtype", "fp16")[0] == 0
    _, lines = run(capsys, "info", tmp_path / "folder", "--json")
    info = json.loads("\n".join(lines))
    assert info["layout"] == "diffusers" and set(info["dtypes"]["unet"]) == {"float16"}
    assert info["hashed_files"][0].endswith("unet/diffusion_pytorch_model.safetensors")
    assert run(capsys, "convert", tmp_path / "folder", tmp_path / "back.safetensors")[0] == 0
    assert main(["convert", str(path), str(tmp_path / "back.safetensors")]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_generate_from_a_model_file_records_its_hash(tiny_file, tmp_path, capsys):
    path, _ = tiny_file
    _, paths = run(capsys, "generate", "x", "--model", path, "--steps", 1, "--size", "32x32", "-q",
                   "--seed", 1, "--out", tmp_path)
    fields = parse_infotext(read_infotext(paths[0])).fields
    assert fields["Model"] == "tiny" and fields["Model hash"] == sha256_file(path)[:10]
    assert main(["generate", "--from-png", paths[0], "--out", str(tmp_path)]) == 2  # needs --model
    assert "pass its file with --model" in capsys.readouterr().err


def test_samplers_lists_names_and_schedules(capsys):
    code, lines = run(capsys, "samplers", "--json")
    data = json.loads("\n".join(lines))
    assert code == 0 and "DPM++ 2M" in [s["name"] for s in data["samplers"]] and "karras" in data["schedules"]


def test_prompts_file_in_one_process(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\na green star\n")
    _, paths = run(capsys, "generate", "--prompts", tmp_path / "p.txt", *TINY, "--seed", 100,
                   "--out", tmp_path / "out")
    made = sorted((parse_infotext(read_infotext(p)).prompt, parse_infotext(read_infotext(p)).fields["Seed"])
                  for p in paths)
    assert made == [("a blue square", "101"), ("a green star", "102"), ("a red circle", "100")]


def test_eval_writes_a_report(tmp_path, capsys):
    code, lines = run(capsys, "eval", "--model", "random:tiny", "--n", 2, "--steps", 1, "--size", "32x32",
                      "--out", tmp_path)
    assert code == 0 and any(line.startswith("colour") for line in lines)
    assert (tmp_path / "report.txt").read_text().strip() and (tmp_path / "contact_sheet.png").is_file()


def test_train_hands_over_to_the_trainer(capsys):
    from importlib.util import find_spec

    if find_spec("sdlab.train.cli") is None:
        assert main(["train"]) == 2
        assert "sdlab.train.cli is missing" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as done:
            main(["train", "--help"])
        assert done.value.code == 0 and "usage: sdlab train" in capsys.readouterr().out


def test_numbered_names_are_unique_under_concurrent_writers(tmp_path):
    import os
    import threading

    from sdlab.outputs import save_png

    image = Image.new("RGB", (4, 4), "blue")
    threads = [threading.Thread(target=lambda: [save_png(image, tmp_path, seed=1, text="p") for _ in range(15)])
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{i:05d}-1.png" for i in range(1, 46)]  # no gaps, no temporaries left
    assert all(read_infotext(tmp_path / n) == "p" for n in names)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / names[0]).stat().st_mode & 0o777 == 0o666 & ~umask


def test_negative_prompt_flag_and_no_abbreviations(tmp_path, capsys):
    """`--negative-prompt` (diffusers' and A1111's name) is `--negative`; it once parsed as an abbreviation of
    `--negative-prompt-2`, which a one-encoder model refuses. Abbreviated flags are not accepted."""
    code, (by_alias,) = run(capsys, "generate", "a red circle", *TINY, "--seed", 3, "--negative-prompt", "blue",
                            "--out", tmp_path / "alias")
    code_2, (by_name,) = run(capsys, "generate", "a red circle", *TINY, "--seed", 3, "--negative", "blue",
                             "--out", tmp_path / "name")
    assert code == code_2 == 0 and np.array_equal(pixels(by_alias), pixels(by_name))
    with pytest.raises(SystemExit):
        main(["generate", "x", *TINY, "--negative-p", "blue"])
    assert "unrecognized arguments: --negative-p" in capsys.readouterr().err
