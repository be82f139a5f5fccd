"""Parity of sdlab's UNet with diffusers' UNet2DConditionModel on SDXL-shaped tiny configs: per-level
transformer depths and head counts, linear projections, and the "text_time" added embedding (pooled text
embedding + sinusoidal features of the size numbers).

As in test_unet.py: random diffusers weights, loaded into sdlab's UNet with strict=True, outputs compared
in fp32 on CPU.
"""

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_unet import diffusers_unet, max_rel_diff, randomize_

from sdlab.checkpoints.configs import config_from_json, config_to_json
from sdlab.config import PRESETS, SD15, UNetConfig
from sdlab.diffusion.conditioning import Conditioning, run_network
from sdlab.errors import ParameterError
from sdlab.nn.unet import UNet
from sdlab.train.config import model_config_from_dict, model_config_to_dict

TOL = 1e-5

# SDXL base in miniature: no attention at the top level, deeper transformers further down, heads per level,
# 6 size numbers (original size, crop, target size) after a pooled text embedding of 16.
BASE_STYLE = UNetConfig(
    channels=(32, 64, 64), attention_levels=(False, True, True), context_dim=64, num_heads=(1, 2, 4),
    transformer_depth=(1, 1, 2), use_linear_projection=True, norm_groups=8,
    added_condition="text_time", added_input_dim=16 + 6 * 8, added_time_ids=6, added_time_dim=8,
)
# The refiner in miniature: 4 levels, attention in the middle two, one depth everywhere, 5 numbers (original
# size, crop, aesthetic score).
REFINER_STYLE = UNetConfig(
    channels=(32, 32, 64, 64), attention_levels=(False, True, True, False), context_dim=48,
    num_heads=(1, 2, 2, 4), transformer_depth=2, use_linear_projection=True, norm_groups=8, layers_per_block=1,
    added_condition="text_time", added_input_dim=24 + 5 * 6, added_time_ids=5, added_time_dim=6,
)
CONFIGS = {"base_style": BASE_STYLE, "refiner_style": REFINER_STYLE}

# The full SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0), and its parameter count in diffusers.
SDXL_BASE = UNetConfig(
    channels=(320, 640, 1280), attention_levels=(False, True, True), context_dim=2048, num_heads=(5, 10, 20),
    transformer_depth=(1, 2, 10), use_linear_projection=True,
    added_condition="text_time", added_input_dim=2816, added_time_ids=6, added_time_dim=256,
)
SDXL_BASE_PARAMETERS = 2_567_463_684


def make_pair(cfg: UNetConfig) -> tuple[UNet2DConditionModel, UNet]:
    ref = randomize_(diffusers_unet(cfg))
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: UNetConfig, batch=2, size=(16, 16), tokens=7):
    x = torch.randn(batch, cfg.in_channels, *size)
    context = torch.randn(batch, tokens, cfg.context_dim)
    pooled = torch.randn(batch, cfg.added_pooled_dim)
    # Pixel sizes and crops as SDXL's pipelines pass them (the refiner's last number is an aesthetic score).
    time_ids = torch.randint(0, 1025, (batch, cfg.added_time_ids)).float()
    return x, context, pooled, time_ids


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_diffusers(name):
    theirs = {k: v.shape for k, v in diffusers_unet(CONFIGS[name]).state_dict().items()}
    ours = {k: v.shape for k, v in UNet(CONFIGS[name]).state_dict().items()}
    assert "add_embedding.linear_1.weight" in ours
    assert ours == theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_diffusers(name):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    x, context, pooled, time_ids = inputs(cfg)
    t = torch.tensor([999.0, 17.5])
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        out = ours(x, t, context, added=torch.cat([pooled, time_ids], dim=1))
    assert max_rel_diff(out, expected) <= TOL


def test_added_condition_changes_the_output():
    _, ours = make_pair(BASE_STYLE)
    x, context, pooled, time_ids = inputs(BASE_STYLE)
    with torch.no_grad():
        a = ours(x, 500, context, added=torch.cat([pooled, time_ids], dim=1))
        b = ours(x, 500, context, added=torch.cat([pooled, time_ids + 64], dim=1))
    assert not torch.allclose(a, b)


def test_run_network_passes_the_added_vector():
    _, ours = make_pair(BASE_STYLE)
    x, context, pooled, time_ids = inputs(BASE_STYLE)
    added = torch.cat([pooled, time_ids], dim=1)
    t = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        assert torch.equal(run_network(ours, x, t, Conditioning(context=context, added=added)),
                           ours(x, t, context, added=added))


def test_deepcache_features_take_the_added_vector():
    _, ours = make_pair(BASE_STYLE)
    x, context, pooled, time_ids = inputs(BASE_STYLE)
    added = torch.cat([pooled, time_ids], dim=1)
    with torch.no_grad():
        full, deep = ours.forward_with_features(x, 10, context, added=added)
        reused, _ = ours.forward_with_features(x, 10, context, deep=deep, added=added)
    assert torch.allclose(full, reused, atol=1e-6)


@pytest.mark.parametrize("added_shape", [None, (2, 21), (1, 22), (2, 22, 1)])
def test_wrong_or_missing_added_vector_raises(added_shape):
    _, ours = make_pair(BASE_STYLE)
    x, context, _, _ = inputs(BASE_STYLE)
    added = None if added_shape is None else torch.zeros(added_shape)
    with pytest.raises(ParameterError, match="added"):
        ours(x, 1, context, added=added)


def test_added_vector_rejected_without_an_added_condition():
    cfg = dataclasses.replace(BASE_STYLE, added_condition=None, added_input_dim=None)
    x, context, _, _ = inputs(BASE_STYLE)
    with pytest.raises(ParameterError, match="added_condition"):
        UNet(cfg)(x, 1, context, added=torch.zeros(2, 22))


def test_per_level_values_and_added_widths():
    assert [BASE_STYLE.heads_at(i) for i in range(3)] == [1, 2, 4]
    assert [BASE_STYLE.depth_at(i) for i in range(3)] == [1, 1, 2]
    assert (BASE_STYLE.added_pooled_dim, BASE_STYLE.added_dim) == (16, 22)
    assert (SDXL_BASE.added_pooled_dim, SDXL_BASE.added_dim) == (1280, 1286)
    listed = dataclasses.replace(BASE_STYLE, num_heads=[1, 2, 4], transformer_depth=[1, 1, 2])
    assert listed == BASE_STYLE and hash(listed) == hash(BASE_STYLE)  # lists stored as tuples: still hashable


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_heads": (1, 2)}, "num_heads has 2 values"),
        ({"num_heads": (1, 2, 0)}, "num_heads must be"),
        ({"num_heads": (1, 2, 3)}, "heads"),  # 64 channels do not split into 3 heads
        ({"transformer_depth": (1, 1, 17)}, "transformer_depth must be"),
        ({"transformer_depth": (1, 1)}, "transformer_depth has 2 values"),
        ({"transformer_depth": "2"}, "transformer_depth must be"),
        ({"added_condition": "text"}, "added_condition must be"),
        ({"added_input_dim": 48}, "added_input_dim must exceed"),  # no room left for the pooled text
        ({"added_input_dim": None}, "added_input_dim must be"),
        ({"added_time_ids": 0}, "added_time_ids must be"),
        ({"added_time_dim": 1.5}, "added_time_dim must be"),
        ({"added_condition": None}, "added_input_dim is set"),
    ],
)
def test_bad_sdxl_fields_raise_parameter_error(changes, match):
    with pytest.raises(ParameterError, match=match):
        dataclasses.replace(BASE_STYLE, **changes)


def test_sd1_config_json_round_trip_keeps_its_values():
    """SD 1.x keeps plain integers for the depth and the head count, and no added condition."""
    back = config_from_json(config_to_json(SD15), "sd15.json")
    assert back == SD15
    assert back.unet.transformer_depth == 1 and back.unet.num_heads == 8 and back.unet.added_condition is None


# UNetConfig's fields before SDXL's: what the saved JSON of an SD 1.x/2.x config holds, as it always did.
SD_UNET_FIELDS = {"in_channels", "out_channels", "channels", "attention_levels", "layers_per_block", "context_dim",
                  "num_heads", "head_dim", "transformer_depth", "use_linear_projection", "upcast_attention",
                  "norm_groups", "norm_eps"}


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if not c.family.startswith("sdxl")))  # SD 1.x/2.x
def test_sd_preset_json_has_only_the_fields_it_had(name):
    model = PRESETS[name]
    assert set(json.loads(config_to_json(model))["unet"]) == SD_UNET_FIELDS
    assert set(model_config_to_dict(model)["unet"]) == SD_UNET_FIELDS


def test_sdxl_shaped_config_json_round_trip():
    model = SD15.replace(unet=BASE_STYLE)
    assert config_from_json(config_to_json(model), "sdxl.json").unet == BASE_STYLE
    assert model_config_from_dict(json.loads(json.dumps(model_config_to_dict(model)))).unet == BASE_STYLE


def test_non_default_added_fields_are_kept_without_an_added_condition():
    model = SD15.replace(unet=dataclasses.replace(SD15.unet, added_time_ids=5))
    assert config_from_json(config_to_json(model), "x.json") == model


@pytest.mark.slow
def test_full_sdxl_base_parameter_count_equals_diffusers():
    with torch.device("meta"):  # shapes only: no 10 GB of real weights
        ours = sum(p.numel() for p in UNet(SDXL_BASE).parameters())
        theirs = sum(p.numel() for p in diffusers_unet(SDXL_BASE).parameters())
    assert ours == theirs == SDXL_BASE_PARAMETERS
