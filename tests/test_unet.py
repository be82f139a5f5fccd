"""Parity of sdlab's UNet with diffusers' UNet2DConditionModel (the reference), on tiny configs.

Each test builds the diffusers model from an sdlab config, gives it random weights (including norm scales and
biases, so that no term is trivially zero), loads its state_dict into sdlab's UNet with strict=True, and
compares outputs in fp32 on CPU.
"""

import dataclasses
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from sdlab.config import SD15, SD21, TINY, UNetConfig
from sdlab.errors import ParameterError
from sdlab.nn.layers import attention, timestep_embedding
from sdlab.nn.unet import UNet

TOL = 1e-4

SD1_STYLE = UNetConfig(  # num_heads fixed, conv projections, 3 levels with the last one attention-free
    channels=(32, 64, 64), attention_levels=(True, True, False), context_dim=24, num_heads=2, norm_groups=8
)
SD2_STYLE = UNetConfig(  # head_dim fixed, linear projections, upcast attention, attention at every level
    channels=(32, 64), attention_levels=(True, True), context_dim=40, num_heads=None, head_dim=16,
    use_linear_projection=True, upcast_attention=True, norm_groups=8,
)
INPAINT = dataclasses.replace(TINY.unet, in_channels=9)
DEEP = dataclasses.replace(SD1_STYLE, transformer_depth=2, layers_per_block=1, out_channels=3)

CONFIGS = {"tiny": TINY.unet, "sd1_style": SD1_STYLE, "sd2_style": SD2_STYLE, "inpaint": INPAINT, "deep": DEEP}


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """The reference model for an sdlab config (the translation sdlab's checkpoint helper does for real)."""
    levels = range(len(cfg.channels))
    return UNet2DConditionModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.context_dim,
        # diffusers' "attention_head_dim" is the number of heads.
        attention_head_dim=tuple(cfg.heads_at(i) for i in levels),
        transformer_layers_per_block=tuple(cfg.depth_at(i) for i in levels),
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        flip_sin_to_cos=True,
        freq_shift=0,
        **(_added_embedding(cfg) if cfg.added_condition else {}),
    )


def _added_embedding(cfg: UNetConfig) -> dict:
    """SDXL's `text_time` added embedding in diffusers' terms."""
    return {"addition_embed_type": cfg.added_condition, "addition_time_embed_dim": cfg.added_time_dim,
            "projection_class_embeddings_input_dim": cfg.added_input_dim}


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights at a scale that keeps activations O(1); norm scales around 1, small random biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # GroupNorm / LayerNorm scale
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return model.eval()


def make_pair(cfg: UNetConfig, random_weights: bool = True) -> tuple[UNet2DConditionModel, UNet]:
    ref = diffusers_unet(cfg)
    if random_weights:
        randomize_(ref)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, relative to the output's scale when that exceeds 1."""
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def run_both(ref, ours, x, t, context) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(x, t, context), ref(x, t, context).sample


def inputs(cfg: UNetConfig, batch=2, size=(16, 16), tokens=7):
    x = torch.randn(batch, cfg.in_channels, *size)
    context = torch.randn(batch, tokens, cfg.context_dim)
    return x, context


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_diffusers(name):
    cfg = CONFIGS[name]
    theirs = {k: v.shape for k, v in diffusers_unet(cfg).state_dict().items()}
    ours = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    assert ours.keys() == theirs.keys()
    assert ours == theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_diffusers(name):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    x, context = inputs(cfg)
    t = torch.tensor([3, 871])  # a different integer timestep per sample
    out, expected = run_both(ref, ours, x, t, context)
    assert out.shape == (2, cfg.out_channels, 16, 16)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert max_rel_diff(out, expected) <= TOL


@pytest.mark.parametrize("t", [999.0, 0.5, torch.tensor(250.25), torch.tensor([0.5]), torch.tensor([0.5, 999.0])])
def test_float_and_scalar_timesteps_match_diffusers(t):
    ref, ours = make_pair(TINY.unet)
    x, context = inputs(TINY.unet)
    out, expected = run_both(ref, ours, x, t, context)
    assert max_rel_diff(out, expected) <= TOL


def test_fractional_timesteps_are_not_rounded():
    _, ours = make_pair(TINY.unet)
    x, context = inputs(TINY.unet, batch=1)
    with torch.no_grad():
        assert not torch.allclose(ours(x, 0.5, context), ours(x, 0.0, context))


def test_batch_with_per_sample_timesteps_equals_separate_runs():
    _, ours = make_pair(SD2_STYLE)
    x, context = inputs(SD2_STYLE, batch=3)
    t = torch.tensor([1.0, 500.0, 999.0])
    with torch.no_grad():
        batched = ours(x, t, context)
        separate = torch.cat([ours(x[i : i + 1], t[i], context[i : i + 1]) for i in range(3)])
    assert (batched - separate).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(16, 24), (24, 8), (10, 14)])  # (10, 14) is not a multiple of 4: odd sizes
def test_non_square_inputs_match_diffusers(size):
    cfg = SD1_STYLE
    ref, ours = make_pair(cfg)
    x, context = inputs(cfg, batch=1, size=size)
    out, expected = run_both(ref, ours, x, torch.tensor([400]), context)
    assert out.shape == (1, cfg.out_channels, *size)
    assert max_rel_diff(out, expected) <= TOL


def test_default_initialisation_also_matches():
    """Loading diffusers' own initial weights (no re-randomisation) gives the same outputs too."""
    ref, ours = make_pair(TINY.unet, random_weights=False)
    x, context = inputs(TINY.unet)
    out, expected = run_both(ref, ours, x, torch.tensor([10, 20]), context)
    assert max_rel_diff(out, expected) <= TOL


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 0.5, 1.0, 17.0, 999.0])
    for dim in (32, 320, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.allclose(timestep_embedding(t, dim), expected, atol=1e-6)


def test_upcast_attention_computes_in_float32_and_returns_input_dtype():
    q, k, v = (torch.randn(2, 9, 4 * 16).bfloat16() for _ in range(3))
    upcast = attention(q, k, v, heads=4, upcast=True)
    assert upcast.dtype == torch.bfloat16
    # Identical to float32 attention on the same (bf16-valued) inputs, rounded once at the end.
    assert torch.equal(upcast, attention(q.float(), k.float(), v.float(), heads=4).bfloat16())


def test_runs_in_bfloat16():
    _, ours = make_pair(SD2_STYLE)
    x, context = inputs(SD2_STYLE)
    with torch.no_grad():
        exact = ours(x, 10.0, context)
        half = ours.to(torch.bfloat16)(x.bfloat16(), 10.0, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert max_rel_diff(half.float(), exact) < 0.1


def test_gradients_flow_to_every_parameter():
    _, ours = make_pair(TINY.unet)
    ours.train()
    x, context = inputs(TINY.unet)
    ours(x, torch.tensor([5, 600]), context).square().mean().backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    "x_shape, t, ctx_shape, match",
    [
        ((2, 3, 16, 16), 1.0, (2, 7, 32), "in_channels"),
        ((2, 4, 16), 1.0, (2, 7, 32), "in_channels"),
        ((2, 4, 16, 16), 1.0, (2, 7, 16), "context_dim"),
        ((2, 4, 16, 16), 1.0, (3, 7, 32), "context"),
        ((2, 4, 16, 16), torch.ones(3), (2, 7, 32), "timesteps"),
    ],
)
def test_bad_inputs_raise_parameter_error(x_shape, t, ctx_shape, match):
    ours = UNet(TINY.unet)
    with pytest.raises(ParameterError, match=match):
        ours(torch.randn(x_shape), t, torch.randn(ctx_shape))


def test_bad_config_raises_parameter_error():
    with pytest.raises(ParameterError, match="norm_groups"):
        UNet(dataclasses.replace(TINY.unet, channels=(30, 64)))
    with pytest.raises(ParameterError, match="head"):
        UNet(dataclasses.replace(TINY.unet, head_dim=12))


@pytest.mark.slow
@pytest.mark.parametrize("preset", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_unet_matches_diffusers(preset):
    cfg = preset.unet
    ref, ours = make_pair(cfg, random_weights=False)
    x, context = inputs(cfg, batch=2, size=(32, 32), tokens=77)
    out, expected = run_both(ref, ours, x, torch.tensor([999.0, 1.0]), context)
    diff = max_rel_diff(out, expected)
    print(f"{preset.name} UNet max diff vs diffusers: {diff:.3g} (output scale {expected.abs().max():.3g})")
    assert diff <= TOL


@pytest.mark.parametrize("cfg", [SD1_STYLE, SD2_STYLE], ids=["conv_projection", "linear_projection"])
def test_channels_last_gives_the_same_output(cfg):
    _, ours = make_pair(cfg)
    x, context = inputs(cfg)
    with torch.no_grad():
        expected = ours(x, 10.0, context)
        out = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), 10.0, context)
    assert (out - expected).abs().max() <= 1e-5
