"""`sdlab info` on SDXL base, inpainting and refiner checkpoints, as single files and diffusers folders: the
family (registry name and label), each component with its parameter count (equal to the diffusers /
transformers networks read from the same folder), prediction, native size and default guidance, the UNet's
added vector, bigG's projection and the VAE's force_upcast, also after a conversion to fp16."""

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdlab import families
from sdlab.checkpoint_info import describe_checkpoint
from sdlab.cli import main
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.model import Model

TINY_SDXL_INPAINT = TINY_SDXL.replace(name="tiny-sdxl-inpaint", unet=dataclasses.replace(TINY_SDXL.unet, in_channels=9))
CONFIGS = {"base": TINY_SDXL, "inpaint": TINY_SDXL_INPAINT, "refiner": TINY_SDXL_REFINER}
REFERENCE = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
             "text_encoder_2": CLIPTextModelWithProjection}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (model, folder, single file)."""
    root = tmp_path_factory.mktemp("sdxl-info")
    out = {}
    for i, (kind, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = Model.build(config)
        folder, file = root / kind, root / f"{kind}.safetensors"
        model.save(folder)
        model.save(file, layout="single-file")
        out[kind] = model, folder, file
    return out


def info_json(capsys, path, *flags):
    assert main(["info", str(path), "--json", "--no-hash", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def info_text(capsys, path):
    assert main(["info", str(path), "--no-hash"]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("layout", ["folder", "single-file"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_json_describes_family_components_and_conditions(saved, capsys, kind, layout):
    model, folder, file = saved[kind]
    info = info_json(capsys, folder if layout == "folder" else file)
    family = families.family_of(model.config)
    assert info["layout"] == ("diffusers" if layout == "folder" else "single-file")
    assert info["family"] == family.name == ("sdxl-refiner" if kind == "refiner" else "sdxl")
    assert info["family_label"] == family.label
    # a preset is named by its name; a folder of no preset's config by the folder's name (as `load` names it)
    assert info["config"] == (folder.name if (kind, layout) == ("inpaint", "folder") else model.config.name)
    assert info["inpainting"] is (kind == "inpaint") and info["unet"]["in_channels"] == (9 if kind == "inpaint" else 4)
    assert info["prediction"] == "epsilon" and info["native_size"] == 64 and info["default_guidance"] == 5.0
    assert info["text_encoders"] == (["text_encoder_2"] if kind == "refiner" else ["text_encoder", "text_encoder_2"])
    assert info["text_encoder_2"] == {"width": 32, "layers": 3, "projection_dim": 32}
    if kind != "refiner":
        assert info["text_encoder"] == {"width": 32, "layers": 3}  # CLIP-L: no projection
    time_ids = 5 if kind == "refiner" else 6
    assert {k: info["unet"][k] for k in ("added_condition", "added_time_ids", "pooled_dim", "context_dim")} == {
        "added_condition": "text_time", "added_time_ids": time_ids, "pooled_dim": 32,
        "context_dim": 32 if kind == "refiner" else 64}
    assert info["vae"]["force_upcast"] is True and info["vae"]["scaling_factor"] == 0.13025
    networks = {name: sum(p.numel() for p in model.components[name].parameters()) for name in info["text_encoders"]}
    networks |= {"unet": sum(p.numel() for p in model.unet.parameters()),
                 "vae": sum(p.numel() for p in model.vae.parameters())}
    assert info["parameters"] == networks | {"total": sum(networks.values())}
    assert all(set(d) == {"float32"} for d in info["dtypes"].values())


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_parameter_counts_and_force_upcast_equal_diffusers(saved, kind):
    """Each component as diffusers / transformers read it from the folder sdlab wrote."""
    _, folder, _ = saved[kind]
    info = describe_checkpoint(folder, hash_files=False)
    for name in info["text_encoders"] + ["unet", "vae"]:
        network = REFERENCE[name].from_pretrained(folder / name)
        assert info["parameters"][name] == sum(p.numel() for p in network.parameters()), name
        if name == "vae":
            assert network.config.force_upcast is True and network.config.scaling_factor == 0.13025


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_text_names_the_family_and_the_sdxl_parts(saved, capsys, kind):
    model, folder, file = saved[kind]
    for path in (folder, file):
        lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in info_text(capsys, path)}
        family = families.family_of(model.config)
        assert lines["family"] == f"{family.label} [{family.name}, config {model.config.name}]"
        assert lines["native size"] == "64x64 (default CFG scale 5)"
        time_ids = 5 if kind == "refiner" else 6
        assert lines["unet"].endswith(f"added text_time vector (pooled text 32 + {time_ids} numbers)")
        assert lines["text enc. 2"] == "width 32, 3 layers, projection 32"
        assert ("text enc." in lines) is (kind == "base")
        assert "force_upcast" in lines["vae"]
        counts = dict(part.rsplit(" ", 1) for part in lines["parameters"].split(", "))
        assert int(counts["unet"].replace(",", "")) == sum(p.numel() for p in model.unet.parameters())


def test_an_fp16_conversion_keeps_force_upcast(saved, capsys, tmp_path):
    _, _, file = saved["base"]
    assert main(["convert", str(file), str(tmp_path / "fp16"), "--dtype", "fp16"]) == 0
    capsys.readouterr()
    info = info_json(capsys, tmp_path / "fp16")
    assert info["family"] == "sdxl" and info["vae"]["force_upcast"] is True
    assert all(set(d) == {"float16"} for d in info["dtypes"].values())


def test_an_sd1_file_has_no_sdxl_fields(capsys, tmp_path):
    model = Model.from_name("random:tiny")
    model.save(tmp_path / "sd1.safetensors", layout="single-file")
    info = info_json(capsys, tmp_path / "sd1.safetensors")
    assert info["family"] == "sd1" and info["default_guidance"] == 7.0
    assert "added_condition" not in info["unet"] and "projection_dim" not in info["text_encoder"]
    assert info["vae"]["force_upcast"] is False
    assert "force_upcast" not in "\n".join(info_text(capsys, tmp_path / "sd1.safetensors"))
