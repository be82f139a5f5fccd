"""ControlNet single files -> diffusers ControlNetModel config + keys (sdlab.control.single_file).

The reference is diffusers itself: a random tiny `ControlNetModel` is written out in the original
(lllyasviel / Stability) layout by a test-only inverse map (regular expressions, independent of the
module's tables), then read back by sdlab and, where it can, by diffusers'
`convert_controlnet_checkpoint`; both conversions, the config and the network outputs are compared.
Full-size configs (SD 1.5, SD 2.1, SDXL) are checked on the meta device against the published ones.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from sdlab.control.single_file import (
    ControlFamily,
    controlnet_config_from_original,
    convert_original_controlnet,
    read_controlnet_file,
)
from sdlab.errors import CheckpointError

CROSS, PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
TINY = ControlFamily("tiny", context_dim=32, num_heads=8)
TINY_XL = ControlFamily("tiny-xl", context_dim=32, head_dim=8, added_time_dim=8)


HINT = (16, 32, 96, 256)  # lllyasviel's hint encoder widths: diffusers' converter knows no others


def tiny_config(layers_per_block: int = 2, hint=HINT) -> dict:
    return dict(block_out_channels=(32, 64), layers_per_block=layers_per_block, cross_attention_dim=32,
                attention_head_dim=8, down_block_types=(CROSS, PLAIN), conditioning_embedding_out_channels=hint)


def tiny_xl_config() -> dict:
    return dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=[4, 8],
                down_block_types=(PLAIN, CROSS), transformer_layers_per_block=[1, 2], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8, conditioning_embedding_out_channels=HINT)


CASES = {  # name -> (diffusers config, the family that supplies its heads)
    "sd-2-layers": (tiny_config(2), TINY),
    "sd-1-layer": (tiny_config(1), TINY),
    "sdxl": (tiny_xl_config(), TINY_XL),
    "sd-small-hint": (tiny_config(1, hint=(16, 32)), TINY),  # other hint widths: sdlab only
}
DIFFUSERS_CASES = ["sd-2-layers", "sd-1-layer", "sdxl"]  # the cases diffusers' converter can read


def random_model(config: dict, seed: int = 0) -> ControlNetModel:
    """A ControlNet with random weights everywhere (the zero convs too: zeros would hide mix-ups)."""
    torch.manual_seed(seed)
    model = ControlNetModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


# --- a test-only inverse map: diffusers -> original -----------------------------------------------------

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
PLAIN_RENAMES = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                 ("conv_in", "input_blocks.0.0"), ("add_embedding.linear_1", "label_emb.0.0"),
                 ("add_embedding.linear_2", "label_emb.0.2"), ("controlnet_mid_block", "middle_block_out.0"),
                 ("mid_block.attentions.0", "middle_block.1"),
                 ("controlnet_cond_embedding.conv_in", "input_hint_block.0")]


def _resnet(rest: str) -> str:
    for ours, theirs in RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def original_key(key: str, n: int, hint_blocks: int) -> str:
    """One diffusers ControlNetModel key in lllyasviel's cldm names (n: layers per block)."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
        return f"input_hint_block.{2 * (hint_blocks + 1)}.{m[1]}"
    for ours, theirs in PLAIN_RENAMES:
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    raise KeyError(key)


def to_original(sd: dict, config: dict, prefix: str = "control_model.") -> dict:
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    n = config["layers_per_block"]
    return {prefix + original_key(k, n, hint_blocks): v for k, v in sd.items()}


def run(model: ControlNetModel, config: dict) -> list[torch.Tensor]:
    """The model's residuals on fixed inputs: 12 down-block residuals and the middle one."""
    g = torch.Generator().manual_seed(1)
    side = 16 * 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)  # each width step halves
    x, hint = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, side, side, generator=g)
    context = torch.randn(1, 5, config["cross_attention_dim"], generator=g)
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    with torch.no_grad():
        down, mid = model(x, 10, context, hint, return_dict=False, **kwargs)
    return [*down, mid]


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def assert_config_matches(ours: dict, reference: ControlNetModel) -> None:
    """Every entry of our config is what the reference model's config holds."""
    for key, value in ours.items():
        if key == "transformer_layers_per_block" and isinstance(value, int) and not isinstance(
                reference.config[key], int):
            # one number where every transformer (the middle one too) has the same depth
            want = reference.config[key]
            levels = [d for d, t in zip(want, reference.config["down_block_types"]) if t == CROSS] + [want[-1]]
            assert set(levels) == {value}, key
            continue
        assert _plain(value) == _plain(reference.config[key]), key


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- conversion against diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_conversion_matches_diffusers_and_round_trips(case):
    config, family = CASES[case]
    reference = random_model(config)
    sd = reference.state_dict()
    original = to_original(sd, config)
    ours_config = controlnet_config_from_original(original, family=family)
    ours = convert_original_controlnet(original, ours_config)
    theirs = convert_controlnet_checkpoint(original, {"layers_per_block": ours_config["layers_per_block"]})
    for key, tensor in theirs.items():  # every key diffusers converts, we convert the same way
        assert key in ours and ours[key] is tensor, key
    # diffusers' single-file converter drops SDXL's added-condition MLP (label_emb); sdlab keeps it.
    added = {k for k in sd if k.startswith("add_embedding.")}
    assert set(ours) - set(theirs) == added
    assert_same_tensors(ours, sd)
    assert_config_matches(ours_config, reference)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_the_reference_keys_and_tensors(case):
    config, family = CASES[case]
    sd = random_model(config).state_dict()
    original = to_original(sd, config)
    config_read = controlnet_config_from_original(original, family=family)
    assert_same_tensors(convert_original_controlnet(original, config_read), sd)


def assert_same_tensors(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], v) for k, v in reference.items())


@pytest.mark.parametrize("case", list(CASES))
def test_config_builds_a_model_that_loads_strictly_and_matches(case):
    config, family = CASES[case]
    reference = random_model(config)
    original = to_original(reference.state_dict(), config)
    ours_config = controlnet_config_from_original(original, family=family)
    model = ControlNetModel(**ours_config).eval()
    model.load_state_dict(convert_original_controlnet(original, ours_config), strict=True)
    assert_same_outputs(run(model, ours_config), run(reference, config))
    if case in DIFFUSERS_CASES and not config.get("addition_embed_type"):  # diffusers' conversion, same config
        via_diffusers = ControlNetModel(**ours_config).eval()
        via_diffusers.load_state_dict(convert_controlnet_checkpoint(original, ours_config), strict=True)
        assert_same_outputs(run(model, ours_config), run(via_diffusers, ours_config))


def test_convert_reads_the_config_itself():
    expected = _with_defaults(SD15_CANNY)
    with torch.device("meta"):
        sd = ControlNetModel(**expected).state_dict()
    assert set(convert_original_controlnet(to_original(sd, expected))) == set(sd)


# --- files ----------------------------------------------------------------------------------------------


def _contiguous(sd: dict) -> dict:
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("case", ["sd-2-layers", "sdxl"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_original_file_round_trip(tmp_path, case, fmt):
    config, family = CASES[case]
    reference = random_model(config)
    original = to_original(reference.state_dict(), config)
    if fmt == "pth":  # control_sd15_*.pth carry the whole SD model beside the ControlNet: ignored
        original["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
        original["first_stage_model.encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)
        path = tmp_path / "control_sd15_canny.pth"
        torch.save({"state_dict": original}, path)
    else:
        path = tmp_path / "control_v11p_sd15_canny.safetensors"
        save_file(_contiguous(original), path)
    config_read, sd = read_controlnet_file(path, family=family)
    assert config_read["global_pool_conditions"] is False
    assert_config_matches(config_read, reference)
    model = ControlNetModel(**config_read).eval()
    model.load_state_dict(sd, strict=True)
    assert_same_outputs(run(model, config_read), run(reference, config))


def test_original_file_without_prefix(tmp_path):
    """thibaud's SD 2.1 ControlNets: the same keys without `control_model.`."""
    config, family = CASES["sd-1-layer"]
    reference = random_model(config)
    path = tmp_path / "controlnet_sd21_canny.safetensors"
    save_file(_contiguous(to_original(reference.state_dict(), config, prefix="")), path)
    config_read, sd = read_controlnet_file(path, family=family)
    assert set(sd) == set(reference.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_keyed_single_file(tmp_path, case):
    """diffusion_pytorch_model.safetensors copied out of a folder (xinsir's SDXL ControlNets)."""
    config, family = CASES[case]
    reference = random_model(config)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(_contiguous(reference.state_dict()), path)
    config_read, sd = read_controlnet_file(path, family=family)
    assert_config_matches(config_read, reference)
    assert set(sd) == set(reference.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items())
    model = ControlNetModel(**config_read).eval()
    model.load_state_dict(sd, strict=True)
    assert_same_outputs(run(model, config_read), run(reference, config))


@pytest.mark.parametrize(("name", "case", "pooled"), [
    ("control_v11e_sd15_shuffle.pth", "sd-2-layers", True),
    ("Control_V11E_SD15_SHUFFLE_fp16.safetensors", "sd-2-layers", True),
    ("control_v11p_sd15_canny.safetensors", "sd-2-layers", False),
    ("shuffle/control_v11p_sd15_canny.safetensors", "sd-2-layers", False),  # the stem, not the folder
    ("sdxl_shuffle.safetensors", "sdxl", False),  # sd-webui-controlnet pools SD 1.x/2.x files only
])
def test_shuffle_name_rule(tmp_path, name, case, pooled):
    config, family = CASES[case]
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    sd = to_original(random_model(config).state_dict(), config)
    if path.suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(_contiguous(sd), path)
    assert read_controlnet_file(path, family=family)[0]["global_pool_conditions"] is pooled


# --- errors ---------------------------------------------------------------------------------------------


def test_unrelated_keys_name_the_file_and_the_expected_keys(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match=r"some_lora\.safetensors.*control_model\.time_embed\.0\.weight"):
        read_controlnet_file(path)


def test_truncated_file(tmp_path):
    config, family = CASES["sd-1-layer"]
    full = tmp_path / "full.safetensors"
    save_file(_contiguous(to_original(random_model(config).state_dict(), config)), full)
    path = tmp_path / "control_truncated.safetensors"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="control_truncated"):
        read_controlnet_file(path, family=family)


def _original(case: str = "sd-2-layers") -> tuple[dict, ControlFamily]:
    config, family = CASES[case]
    return to_original(random_model(config).state_dict(), config), family


def test_inconsistent_shapes(tmp_path):
    original, family = _original()
    original["control_model.zero_convs.3.0.weight"] = torch.zeros(64, 64, 1, 1)  # block 3 is 32 wide
    path = tmp_path / "control_bad.safetensors"
    save_file(_contiguous(original), path)
    with pytest.raises(CheckpointError, match=r"control_bad.*inconsistent.*'controlnet_down_blocks\.3\.weight' is "
                                              r"\(64, 64, 1, 1\), expected \(32, 32, 1, 1\)"):
        read_controlnet_file(path, family=family)


def test_missing_and_unexpected_keys_are_listed():
    original, family = _original()
    del original["control_model.zero_convs.2.0.bias"]
    with pytest.raises(CheckpointError, match=r"absent.*controlnet_down_blocks\.2\.bias"):
        convert_original_controlnet(original, controlnet_config_from_original(original, family=family))
    original, _ = _original()
    original["control_model.input_blocks.1.7.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected.*input_blocks\.1\.7"):
        convert_original_controlnet(original, controlnet_config_from_original(original, family=family))
    original, _ = _original()
    original["control_model.input_blocks.1.1.transformer_blocks.0.attn1.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected.*attn1\.extra"):
        convert_original_controlnet(original, controlnet_config_from_original(original, family=family))


def test_transformers_without_blocks_are_refused():
    """diffusers' controlnet-canny-sdxl-1.0-mid / -small: norm and projections with no transformer block."""
    original, family = _original("sdxl")
    original = {k: v for k, v in original.items() if ".input_blocks.4.1.transformer_blocks." not in k}
    with pytest.raises(CheckpointError, match=r"input_blocks\.4\.1\..*not supported"):
        controlnet_config_from_original(original, family=family)


def test_unknown_context_width_asks_for_a_family():
    original, _ = _original()
    with pytest.raises(CheckpointError, match=r"32-wide text context.*family="):
        controlnet_config_from_original(original)


def test_control_lora_is_refused(tmp_path):
    original, family = _original()
    original["lora_controlnet"] = torch.zeros(1)
    path = tmp_path / "control-lora-canny-rank256.safetensors"
    save_file(_contiguous({k.removeprefix("control_model."): v for k, v in original.items()}), path)
    with pytest.raises(CheckpointError, match="Control-LoRA"):
        read_controlnet_file(path, family=family)


def test_heads_that_do_not_divide_the_widths():
    original, _ = _original()
    with pytest.raises(CheckpointError, match="do not form a odd UNet encoder"):
        controlnet_config_from_original(original, family=ControlFamily("odd", 32, num_heads=7))


# --- full-size shapes on the meta device ----------------------------------------------------------------

# config.json of lllyasviel/control_v11p_sd15_canny (diffusers 0.16).
SD15_CANNY = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": [CROSS, CROSS, CROSS, PLAIN], "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
    "upcast_attention": False, "use_linear_projection": False,
}
# config.json of thibaud/controlnet-sd21-canny-diffusers (SD 2.1: heads of 64 channels, linear projections).
SD21_CANNY = {**SD15_CANNY, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
              "use_linear_projection": True}
# config.json of diffusers/controlnet-canny-sdxl-1.0 (diffusers 0.20).
SDXL_CANNY = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "class_embed_type": None, "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": [PLAIN, CROSS, CROSS], "downsample_padding": 1, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None, "use_linear_projection": True,
}


def _with_defaults(published: dict) -> dict:
    """A config.json as ControlNetModel reads it: its entries over the constructor's defaults."""
    defaults = {name: p.default for name, p in inspect.signature(ControlNetModel.__init__).parameters.items()
                if name != "self"}
    return {k: _plain(v) for k, v in {**defaults, **published}.items()}


@pytest.mark.parametrize("published", [SD15_CANNY, SD21_CANNY, SDXL_CANNY], ids=["sd15", "sd21", "sdxl"])
def test_full_size_config_equals_the_published_one(published):
    expected = _with_defaults(published)
    with torch.device("meta"):
        model = ControlNetModel(**expected)
    sd = model.state_dict()
    original = to_original(sd, expected)
    ours = controlnet_config_from_original(original)  # family found by the context width
    assert set(ours) <= set(expected)
    for key, value in ours.items():
        if key == "upcast_attention":  # SDXL's file says null (copied from its UNet's), ours False: both off
            assert bool(value) == bool(expected[key])
            continue
        assert _plain(value) == expected[key], key
    converted = convert_original_controlnet(original, ours)
    assert set(converted) == set(sd) and all(converted[k].shape == v.shape for k, v in sd.items())


@pytest.mark.parametrize("published", [SD15_CANNY, SD21_CANNY, SDXL_CANNY], ids=["sd15", "sd21", "sdxl"])
def test_sdlab_controlnet_takes_the_converted_keys(published):
    """The config and keys build sdlab's own ControlNet (its config reader, then strict key and shape checks)."""
    from sdlab.checkpoints.configs import controlnet_from_diffusers
    from sdlab.nn.controlnet import ControlNet

    expected = _with_defaults(published)
    with torch.device("meta"):
        sd = ControlNetModel(**expected).state_dict()
        original = to_original(sd, expected)
        ours = controlnet_config_from_original(original)
        net = ControlNet(controlnet_from_diffusers(ours, "test"))
    converted = convert_original_controlnet(original, ours)
    theirs = net.state_dict()
    assert set(converted) == set(theirs)
    assert all(converted[k].shape == v.shape for k, v in theirs.items())
