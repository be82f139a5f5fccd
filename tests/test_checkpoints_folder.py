"""load_checkpoint / save_diffusers / save_single_file end to end, against diffusers' own pipeline loading and
saving (tiny random-weight models)."""

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from test_checkpoints_support import TINY_CONFIGS, TINY_SD1, TINY_SD2, assert_same_state_dict, reference_state_dicts

from sdlab.checkpoints import (
    DestinationExistsError,
    diffusers_to_ldm,
    load_checkpoint,
    save_diffusers,
    save_single_file,
)
from sdlab.errors import CheckpointError

COMPONENTS = ("unet", "vae", "text_encoder")


def _save_folder(path, config, states, **kwargs):
    return save_diffusers(path, config, states, **kwargs)


def _assert_weights(ckpt, states):
    for name in COMPONENTS:
        assert_same_state_dict(getattr(ckpt, name), states[name])


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_diffusers_loads_the_folder_we_write(tmp_path, config):
    states = reference_state_dicts(config)
    folder = _save_folder(tmp_path / "model", config, states)
    cls = StableDiffusionInpaintPipeline if config.is_inpainting else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    assert type(pipe) is cls
    assert_same_state_dict(pipe.unet.state_dict(), states["unet"])
    assert_same_state_dict(pipe.vae.state_dict(), states["vae"])
    text = {
        k if k.startswith("text_model.") else "text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()
    }
    assert_same_state_dict(text, states["text_encoder"])
    assert pipe.scheduler.config.prediction_type == config.prediction
    assert pipe.tokenizer.pad_token_id == config.text_encoder.pad_token_id
    ids = pipe.tokenizer("a fantasy landscape with mountains and a river").input_ids
    assert ids == [49406, 320, 5267, 5727, 593, 5873, 537, 320, 2473, 49407]


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=lambda c: c.name)
def test_folder_round_trip(tmp_path, config):
    states = reference_state_dicts(config)
    folder = _save_folder(tmp_path / "model", config, states)
    ckpt = load_checkpoint(folder)
    assert ckpt.config == config.replace(name="model")
    assert ckpt.tokenizer_dir == folder / "tokenizer" and ckpt.source == folder
    _assert_weights(ckpt, states)


def test_folder_fp16_variant(tmp_path):
    states = reference_state_dicts(TINY_SD2)
    folder = _save_folder(tmp_path / "model", TINY_SD2, states, dtype=torch.float16, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(CheckpointError, match="variant"):
        load_checkpoint(folder)
    ckpt = load_checkpoint(folder, variant="fp16")
    assert ckpt.unet["conv_in.weight"].dtype == torch.float16
    half = {n: {k: v.half() for k, v in sd.items()} for n, sd in states.items()}
    _assert_weights(ckpt, half)
    ckpt = load_checkpoint(folder, variant="fp16", dtype=torch.float32)  # conversion only when asked
    assert ckpt.vae["encoder.conv_in.weight"].dtype == torch.float32


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["sharded-safetensors", "bin"])
def test_reads_what_diffusers_saves(tmp_path, safe_serialization):
    """Sharded fp16-variant safetensors with index files, or .bin pickles (through the safe reader)."""
    states = reference_state_dicts(TINY_SD2)
    pipe = StableDiffusionPipeline.from_pretrained(_save_folder(tmp_path / "ours", TINY_SD2, states))
    pipe.save_pretrained(
        tmp_path / "theirs", variant="fp16", max_shard_size="100KB", safe_serialization=safe_serialization
    )
    if safe_serialization:
        assert (tmp_path / "theirs" / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    ckpt = load_checkpoint(tmp_path / "theirs", variant="fp16")
    assert ckpt.config == TINY_SD2.replace(name="theirs")
    _assert_weights(ckpt, states)


def test_missing_shard_is_reported(tmp_path):
    states = reference_state_dicts(TINY_SD1)
    pipe = StableDiffusionPipeline.from_pretrained(_save_folder(tmp_path / "ours", TINY_SD1, states))
    pipe.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    shard = sorted((tmp_path / "theirs" / "vae").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(tmp_path / "theirs")


def test_unsupported_pipeline_folder(tmp_path):
    states = reference_state_dicts(TINY_SD1)
    folder = _save_folder(tmp_path / "model", TINY_SD1, states)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"]
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"text_encoder_2"):  # read as SDXL, whose second encoder is missing
        load_checkpoint(folder)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_single_file_round_trip(tmp_path, config):
    states = reference_state_dicts(config)
    path = save_single_file(
        tmp_path / "model.safetensors", config, states
    )
    ckpt = load_checkpoint(path)
    assert ckpt.config == config  # exactly, from the config sdlab stores in the file's metadata
    assert ckpt.tokenizer_dir is None
    _assert_weights(ckpt, states)


def test_single_file_fp16(tmp_path):
    states = reference_state_dicts(TINY_SD1)
    path = save_single_file(
        tmp_path / "m.safetensors", TINY_SD1, states, dtype=torch.float16
    )
    assert path.stat().st_size < 0.6 * sum(v.numel() * 4 for sd in states.values() for v in sd.values())
    ckpt = load_checkpoint(path)
    assert ckpt.unet["conv_in.weight"].dtype == torch.float16
    assert torch.equal(ckpt.unet["conv_in.weight"], states["unet"]["conv_in.weight"].half())


def test_original_lightning_ckpt_with_extras(tmp_path):
    """An original-style .ckpt: torch zip, weights under state_dict, global_step beside them, the full
    OpenCLIP tower, EMA weights and schedule buffers. Read with an explicit family (tiny configs cannot be
    told apart by shapes alone: head size and GroupNorm groups are not in any shape)."""
    config = dataclasses.replace(TINY_SD2, prediction="epsilon")
    states = reference_state_dicts(config)
    ldm = diffusers_to_ldm(states, config)
    n = config.text_encoder.num_layers
    ldm.update(
        {
            k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn_like(v)
            for k, v in ldm.items()
            if f"resblocks.{n - 1}." in k
        }
    )
    ldm["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    ldm["alphas_cumprod"] = torch.rand(1000)
    torch.save({"state_dict": ldm, "global_step": 875000, "epoch": 3}, tmp_path / "sd2.ckpt")
    ckpt = load_checkpoint(tmp_path / "sd2.ckpt", family=TINY_SD2, prediction="epsilon")
    assert ckpt.config == config
    _assert_weights(ckpt, states)


def test_saves_refuse_to_overwrite(tmp_path):
    states = reference_state_dicts(TINY_SD1)
    args = (TINY_SD1, states)
    folder = save_diffusers(tmp_path / "model", *args)
    path = save_single_file(tmp_path / "model.safetensors", *args)
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        save_diffusers(folder, *args)
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        save_single_file(path, *args)
    save_diffusers(folder, *args, overwrite=True)
    save_single_file(path, *args, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.safetensors"]  # no temporaries


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_a_models_own_default_guidance_survives_folders_and_single_files(tmp_path):
    config = TINY_SD1.replace(default_guidance=3.0)
    states = reference_state_dicts(config)
    folder = _save_folder(tmp_path / "model", config, states)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_sdlab_default_guidance"] == 3.0  # diffusers ignores keys that start with "_"
    assert StableDiffusionPipeline.from_pretrained(folder).unet is not None
    assert load_checkpoint(folder).config.default_guidance == 3.0
    plain = _save_folder(tmp_path / "plain", TINY_SD1, states)  # SD's usual 7: no key at all
    assert "_sdlab_default_guidance" not in json.loads((plain / "model_index.json").read_text())
    single = save_single_file(tmp_path / "m.safetensors", config, states)
    assert load_checkpoint(single).config.default_guidance == 3.0
    index["_sdlab_default_guidance"] = "high"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="_sdlab_default_guidance is not a number from 0 to 100"):
        load_checkpoint(folder)
