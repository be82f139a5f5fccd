"""SDXL in the diffusers folder layout: the config.json files of Stability's published folders read as sdlab's
presets, folders sdlab writes loaded by diffusers' SDXL pipelines with the same weights, and what diffusers
writes (fp16 variant, sharded) read back."""

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

from sdlab.checkpoints import configs, load_checkpoint
from sdlab.checkpoints.diffusers_folder import read_folder_config, write_tokenizer
from sdlab.errors import CheckpointError
from sdlab.families.sdxl import SDXL_BASE, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER
from sdlab.model import Model

TINY_SDXL_INPAINT = TINY_SDXL.replace(name="tiny-sdxl-inpaint", unet=dataclasses.replace(TINY_SDXL.unet, in_channels=9))

# The config.json files of stabilityai/stable-diffusion-xl-base-1.0 (fields as published, diffusers 0.19).
BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}  # fmt: skip
CLIP_L = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float16", "vocab_size": 49408,
}  # fmt: skip
BIGG = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
        "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}  # fmt: skip
BASE_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip
# stabilityai/stable-diffusion-xl-refiner-1.0: bigG only, 4 levels, 5 size/aesthetic numbers.
REFINER_UNET = {
    **BASE_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip
REFINER_INDEX = {
    **BASE_INDEX, "_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True, "text_encoder": [None, None], "tokenizer": [None, None],
}  # fmt: skip


def _write_published_folder(folder, index, networks):
    """A folder holding the published config files only (no weights: configs are read without them)."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, config in {**networks, "scheduler": SCHEDULER}.items():
        (folder / name).mkdir()
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config))
    pads = {"tokenizer": 49407, "tokenizer_2": 0}  # <|endoftext|> and "!"
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if index[tokenizer][0] is not None:
            write_tokenizer(folder / tokenizer, pads[tokenizer], 77)
    return folder


def test_published_base_and_refiner_configs_read_as_the_presets(tmp_path):
    base = _write_published_folder(tmp_path / "base", BASE_INDEX,
                                   {"unet": BASE_UNET, "vae": VAE, "text_encoder": CLIP_L, "text_encoder_2": BIGG})
    assert read_folder_config(base) == SDXL_BASE  # named after the preset it equals, guidance 5 as diffusers'
    refiner = _write_published_folder(tmp_path / "refiner", REFINER_INDEX,
                                      {"unet": REFINER_UNET, "vae": VAE, "text_encoder_2": BIGG})
    assert read_folder_config(refiner) == SDXL_REFINER


def test_unet_config_translation_round_trips_and_writes_diffusers_fields():
    for preset, published in ((SDXL_BASE, BASE_UNET), (SDXL_REFINER, REFINER_UNET)):
        written = configs.unet_to_diffusers(preset.unet, 128)
        for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                    "attention_head_dim", "transformer_layers_per_block", "block_out_channels", "cross_attention_dim"):
            assert written[key] == published[key], key
        ids = preset.unet.added_time_ids
        assert configs.unet_from_diffusers(written, added_time_ids=ids) == preset.unet


def test_text_encoder_and_vae_translation():
    bigg = configs.text_encoder_from_transformers(BIGG, pad_token_id=0)
    assert bigg == SDXL_BASE.network("text_encoder_2")
    assert configs.text_encoder_from_transformers(CLIP_L) == SDXL_BASE.text_encoder  # no projection read
    written = configs.text_encoder_to_transformers(bigg)
    assert written["architectures"] == ["CLIPTextModelWithProjection"] and written["projection_dim"] == 1280
    other_eos = configs.text_encoder_from_transformers({**BIGG, "eos_token_id": 7}, pad_token_id=0)
    assert other_eos.eos_token_id == 7  # transformers then looks for the first id 7, and so does sdlab
    vae = configs.vae_from_diffusers(VAE, reads_force_upcast=True)
    assert vae == SDXL_BASE.vae and configs.vae_from_diffusers({**VAE, "force_upcast": False}, reads_force_upcast=True
                                                                ).force_upcast is False
    assert configs.vae_from_diffusers(VAE).force_upcast is False  # SD 1.x/2.x pipelines ignore the flag


@pytest.mark.parametrize("field, value, match", [
    ("addition_embed_type", "image", "addition_embed_type"),
    ("transformer_layers_per_block", [1, 2], "one per level"),
    ("projection_class_embeddings_input_dim", None, "projection_class_embeddings_input_dim"),
    ("reverse_transformer_layers_per_block", [[1], [2], [3]], "reverse_transformer_layers_per_block"),
])  # fmt: skip
def test_unsupported_unet_fields_are_named(field, value, match):
    with pytest.raises(CheckpointError, match=match):
        configs.unet_from_diffusers({**BASE_UNET, field: value})


@pytest.mark.parametrize("config, pipeline", [
    (TINY_SDXL, StableDiffusionXLPipeline), (TINY_SDXL_REFINER, StableDiffusionXLImg2ImgPipeline),
    (TINY_SDXL_INPAINT, StableDiffusionXLInpaintPipeline),
], ids=["base", "refiner", "inpaint"])  # fmt: skip
def test_diffusers_loads_the_folder_we_write_and_we_read_it_back(tmp_path, config, pipeline):
    torch.manual_seed(0)
    model = Model.build(config)
    folder = model.save(tmp_path / "model")
    pipe = pipeline.from_pretrained(folder)
    assert type(pipe) is pipeline
    for name, net in model.components.items():
        theirs = {_with_text_model(k) if "text" in name else k: v for k, v in getattr(pipe, name).state_dict().items()
                  if not k.endswith("position_ids")}
        ours = net.state_dict()
        assert sorted(theirs) == sorted(ours), name
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), name
    assert pipe.tokenizer_2.pad_token == "!" and pipe.vae.config.force_upcast
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    if config.text_encoder is None:
        assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    loaded = Model.load(folder)
    assert loaded.config.replace(name=config.name) == config  # (named after a preset it equals, else the folder)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in model.unet.state_dict().items())


def test_reads_what_diffusers_saves_fp16_sharded(tmp_path):
    torch.manual_seed(0)
    model = Model.build(TINY_SDXL)
    pipe = StableDiffusionXLPipeline.from_pretrained(model.save(tmp_path / "ours"))
    pipe.to(torch.float16).save_pretrained(tmp_path / "theirs", variant="fp16", max_shard_size="100KB")
    assert (tmp_path / "theirs" / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    loaded = Model.load(tmp_path / "theirs", variant="fp16")
    assert loaded.config == TINY_SDXL
    for name, net in model.components.items():
        theirs = getattr(loaded, name).state_dict()
        assert all(torch.equal(theirs[k], v.half().float()) for k, v in net.state_dict().items()), name


def test_a_refiner_is_not_read_as_a_base_nor_the_reverse(tmp_path):
    refiner, base = Model.build(TINY_SDXL_REFINER), Model.build(TINY_SDXL)
    folder = refiner.save(tmp_path / "refiner")
    with pytest.raises(CheckpointError, match=r"a model of SDXL refiner .* cannot be read as 'sdxl-base'"):
        load_checkpoint(folder, family="sdxl-base")
    file = base.save(tmp_path / "base.safetensors", layout="single-file")
    with pytest.raises(CheckpointError, match=r"a model of SDXL \(.* cannot be read as 'sdxl-refiner'"):
        load_checkpoint(file, family="sdxl-refiner")
    with pytest.raises(CheckpointError, match=r"cannot be read as 'sd15'"):
        load_checkpoint(file, family="sd15")
    assert load_checkpoint(folder, family="sdxl-refiner").config == TINY_SDXL_REFINER  # its own family: fine


def _with_text_model(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def test_diffusers_single_file_loader_reads_our_export(tmp_path):
    """diffusers' own converter (`from_single_file(file, config=folder)`) reads sdlab's single-file SDXL export
    into the same networks as the folder: the same image. (The two text encoders differ in width here, as
    in SDXL: diffusers tells them apart by width.)"""
    import numpy as np

    te2 = dataclasses.replace(TINY_SDXL.network("text_encoder_2"), width=64, projection_dim=64)
    unet = dataclasses.replace(TINY_SDXL.unet, context_dim=32 + 64, added_input_dim=64 + 6 * 8)
    config = TINY_SDXL.replace(name="wide", unet=unet, extra_networks={"text_encoder_2": te2})
    torch.manual_seed(0)
    model = Model.build(config)
    folder, file = model.save(tmp_path / "model"), model.save(tmp_path / "model.safetensors", layout="single-file")
    from_file = StableDiffusionXLPipeline.from_single_file(file, config=str(folder), local_files_only=True)
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs, ours = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in ours.items()), name
    images = [pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
              for pipe in (from_file, from_folder)]
    # The same weights; a level here and there may still differ: the two pipelines' tensors sit at other
    # alignments (memory-mapped or not), which can change the CPU kernels' summation order.
    assert np.abs(np.asarray(images[0], dtype=int) - np.asarray(images[1], dtype=int)).max() <= 1
