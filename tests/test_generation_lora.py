"""LoRA at generation time: `<lora:name:w>` prompt tags and `GenerationParams.loras`, merged per call."""

import pytest
import torch

import sdlab
from sdlab.config import TINY
from sdlab.errors import ParameterError
from sdlab.lora import inject_lora
from sdlab.params import GenerationParams
from sdlab.resources import LORA_SUFFIXES, ResourceFolder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdlab.Model.build(TINY)


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    network = inject_lora(model, rank=4, text_encoder=True)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(0, 0.5)  # a fresh adapter is zero: give it an effect
    folder = tmp_path_factory.mktemp("loras")
    network.save(folder / "style.safetensors")
    return folder


def folder(path):
    return ResourceFolder("LoRA", [path], LORA_SUFFIXES)


def test_prompt_tag_applies_and_restores(model, lora_dir):
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    plain = sdlab.generate(model, GenerationParams(prompt="a red circle", steps=4, seed=5)).latents
    tagged = sdlab.generate(model, GenerationParams(prompt="a red circle <lora:style:0.8>", steps=4, seed=5),
                            named_loras=folder(lora_dir)).latents
    assert (tagged - plain).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # weights restored
    again = sdlab.generate(model, GenerationParams(prompt="a red circle", steps=4, seed=5)).latents
    assert torch.equal(again, plain)


def test_tag_and_api_argument_are_the_same(model, lora_dir):
    tagged = sdlab.generate(model, GenerationParams(prompt="a red circle <lora:style:0.5>", steps=4, seed=5),
                            named_loras=folder(lora_dir)).latents
    by_path = sdlab.generate(model, GenerationParams(prompt="a red circle", steps=4, seed=5,
                                                     loras=((str(lora_dir / "style.safetensors"), 0.5),))).latents
    assert torch.equal(tagged, by_path)


def test_weight_zero_is_no_change(model, lora_dir):
    plain = sdlab.generate(model, GenerationParams(prompt="a red circle", steps=4, seed=5)).latents
    zero = sdlab.generate(model, GenerationParams(prompt="a red circle <lora:style:0>", steps=4, seed=5),
                          named_loras=folder(lora_dir)).latents
    assert torch.allclose(zero, plain, atol=1e-6)


def test_unknown_lora_is_a_clear_error(model, lora_dir):
    with pytest.raises(ParameterError, match="unknown LoRA 'nope'; available: style"):
        sdlab.generate(model, GenerationParams(prompt="x <lora:nope:1>", steps=2, seed=1), named_loras=folder(lora_dir))


def test_names_are_never_paths(model, lora_dir):
    """A tag names a file inside the folders given, never a path: separators, '..' and absolute paths are
    refused before any file is looked at, and the message quotes only the name."""
    for name in (str(lora_dir / "style"), "../style", "..", "a/b", "a\\b", ".hidden", "/etc/hostname", "x\0y"):
        with pytest.raises(ParameterError, match="is not valid"):
            sdlab.generate(model, GenerationParams(prompt=f"x <lora:{name}:1>", steps=2, seed=1),
                           named_loras=folder(lora_dir))


def test_a_tag_without_named_loras_is_refused(model, lora_dir):
    """The library never resolves a name by itself (it used to try the name as a path, then ./loras)."""
    with pytest.raises(ParameterError, match="given no named LoRAs"):
        sdlab.generate(model, GenerationParams(prompt="x <lora:style:1>", steps=2, seed=1))
    path = str(lora_dir / "style.safetensors")
    with pytest.raises(ParameterError, match="given no named LoRAs"):
        sdlab.generate(model, GenerationParams(prompt=f"x <lora:{path}:1>", steps=2, seed=1))


def test_cli_finds_tags_in_its_lora_dir_only(lora_dir, tmp_path, capsys):
    from sdlab.cli import main

    common = ["--model", "random:tiny", "--size", "32x32", "--steps", "2", "--seed", "4", "-q"]
    assert main(["generate", "a red circle", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["generate", "a red circle <lora:style:0.8>", *common, "--lora-dir", str(lora_dir),
                 "--out", str(tmp_path / "styled")]) == 0
    plain, styled = (next((tmp_path / name).glob("*.png")).read_bytes() for name in ("plain", "styled"))
    assert plain != styled
    path = lora_dir / "style"
    assert main(["generate", f"x <lora:{path}:1>", *common, "--out", str(tmp_path / "bad")]) != 0
    assert "is not valid" in capsys.readouterr().err
