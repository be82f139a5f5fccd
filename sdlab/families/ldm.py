"""The original single-file layout shared by the latent-diffusion families (SD 1.x, SD 2.x; SDXL's UNet too).

The original layout is the one of CompVis' latent-diffusion code (Rombach et al. 2022) that Stability's
`.ckpt`/`.safetensors` releases use: one flat state dict with the UNet under `model.diffusion_model.` and
the VAE under `first_stage_model.` (the text encoders are the families' own). sdlab's networks use the
diffusers names, so loading or writing such a file is a renaming, given here as tables of (original,
diffusers) prefixes generated from the config by enumerating levels and blocks (non-standard sizes work).

Reading a config off shapes: UNet levels/channels/layers per block from where the downsampling
convolutions (`input_blocks.N.0.op`) sit and the widths of the ResBlocks, attention levels from which
blocks carry a transformer; VAE levels and widths likewise. What shapes cannot tell (attention heads, the
schedule, the VAE scaling) the family supplies.

**Prediction (epsilon or v).** An original checkpoint has no flag for it. `stated_prediction` gives what a
file says, first match wins: 1. safetensors metadata `prediction_type` (sdlab writes it) or
`modelspec.prediction_type` ("epsilon"/"v"); 2. a `v_pred` marker key in the state dict (a community
convention). Otherwise each family has its own rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import UNetConfig, VAEConfig
from ..errors import CheckpointError
from .base import KeyMap, Pair

UNET_ROOT = "model.diffusion_model."
VAE_ROOT = "first_stage_model."
V_PRED_MARKERS = ("v_pred",)
_BLOCK_NUMBER = re.compile(r"[0-9]{1,4}")  # SD's largest is 23 (OpenCLIP's resblocks)

# Inside a UNet ResBlock: GroupNorm, SiLU, conv | time-embedding projection | GroupNorm, SiLU, dropout, conv.
UNET_RESNET: list[Pair] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
]
UNET_SHORTCUT: Pair = ("skip_connection", "conv_shortcut")  # only where the channel count changes

VAE_RESNET: list[Pair] = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
VAE_SHORTCUT: Pair = ("nin_shortcut", "conv_shortcut")
VAE_ATTENTION: list[Pair] = [
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
]
VAE_ATTENTION_CONV1X1 = ("to_q", "to_k", "to_v", "to_out.0")
VAE_IGNORED = ("loss",)  # the training loss' discriminator and LPIPS weights


def has_unet_and_vae(keys) -> bool:
    """The two networks every latent-diffusion single file has (its first convolutions)."""
    return UNET_ROOT + "input_blocks.0.0.weight" in keys and VAE_ROOT + "encoder.conv_in.weight" in keys


# --- UNet key map ---------------------------------------------------------------------------------------


def unet_keymap(cfg: UNetConfig) -> KeyMap:
    pairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        *_unet_encoder(cfg),
        *_unet_middle(cfg),
        *_unet_decoder(cfg),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if cfg.added_condition is not None:  # SDXL's MLP of the added vector (pooled text + size features)
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    return KeyMap(UNET_ROOT, tuple(pairs))


def _unet_encoder(cfg: UNetConfig) -> list[Pair]:
    """input_blocks.1... : per level, `layers_per_block` x (ResBlock [, SpatialTransformer]), then a
    downsampling conv (`op`) in a block of its own, except after the last level."""
    n, levels = cfg.layers_per_block, len(cfg.channels)
    pairs, block, in_ch = [], 1, cfg.channels[0]
    for level, (ch, attention) in enumerate(zip(cfg.channels, cfg.attention_levels, strict=True)):
        for j in range(n):
            pairs += _unet_resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", in_ch != ch)
            if attention:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}"))
            block, in_ch = block + 1, ch
        if level < levels - 1:
            pairs.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            block += 1
    return pairs


def _unet_middle(cfg: UNetConfig) -> list[Pair]:
    return [
        *_unet_resnet("middle_block.0", "mid_block.resnets.0", False),
        ("middle_block.1", "mid_block.attentions.0"),
        *_unet_resnet("middle_block.2", "mid_block.resnets.1", False),
    ]


def _unet_decoder(cfg: UNetConfig) -> list[Pair]:
    """output_blocks.0... : per level from the deepest, `layers_per_block + 1` x (ResBlock on the
    concatenated skip connection [, SpatialTransformer]), the last one followed by an upsampling conv."""
    n, levels = cfg.layers_per_block, len(cfg.channels)
    pairs, block = [], 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(n + 1):
            # Every decoder ResBlock takes more channels than it gives (skip concatenation): always a shortcut.
            pairs += _unet_resnet(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", True)
            if cfg.attention_levels[level]:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}"))
            if j == n and up < levels - 1:
                slot = 2 if cfg.attention_levels[level] else 1
                pairs.append((f"output_blocks.{block}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
            block += 1
    return pairs


def _unet_resnet(original: str, diffusers: str, shortcut: bool) -> list[Pair]:
    leaves = UNET_RESNET + ([UNET_SHORTCUT] if shortcut else [])
    return [(f"{original}.{a}", f"{diffusers}.{b}") for a, b in leaves]


# --- VAE key map ----------------------------------------------------------------------------------------


def vae_keymap(cfg: VAEConfig) -> KeyMap:
    pairs = [
        *_vae_encoder(cfg),
        ("quant_conv", "quant_conv"),
        ("post_quant_conv", "post_quant_conv"),
        *_vae_decoder(cfg),
    ]
    conv1x1 = frozenset(
        f"{part}.mid_block.attentions.0.{name}" for part in ("encoder", "decoder") for name in VAE_ATTENTION_CONV1X1
    )
    return KeyMap(VAE_ROOT, tuple(pairs), conv1x1=conv1x1, ignored=VAE_IGNORED)


def _vae_encoder(cfg: VAEConfig) -> list[Pair]:
    pairs, in_ch, levels = [("encoder.conv_in", "encoder.conv_in")], cfg.channels[0], len(cfg.channels)
    for level, ch in enumerate(cfg.channels):
        for j in range(cfg.layers_per_block):
            original, diffusers = f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}"
            pairs += _vae_resnet(original, diffusers, in_ch != ch)
            in_ch = ch
        if level < levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
    pairs += _vae_middle("encoder")
    return pairs + [("encoder.norm_out", "encoder.conv_norm_out"), ("encoder.conv_out", "encoder.conv_out")]


def _vae_decoder(cfg: VAEConfig) -> list[Pair]:
    """The original numbers decoder levels by resolution (`up.0` is the full-resolution one, built last);
    diffusers numbers them in execution order (`up_blocks.0` is the deepest)."""
    pairs, in_ch, levels = [("decoder.conv_in", "decoder.conv_in")], cfg.channels[-1], len(cfg.channels)
    pairs += _vae_middle("decoder")
    for up in range(levels):
        level = levels - 1 - up
        ch = cfg.channels[level]
        for j in range(cfg.layers_per_block + 1):
            pairs += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", in_ch != ch)
            in_ch = ch
        if level > 0:
            pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return pairs + [("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]


def _vae_middle(part: str) -> list[Pair]:
    return [
        *_vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False),
        *[(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in VAE_ATTENTION],
        *_vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False),
    ]


def _vae_resnet(original: str, diffusers: str, shortcut: bool) -> list[Pair]:
    leaves = VAE_RESNET + ([VAE_SHORTCUT] if shortcut else [])
    return [(f"{original}.{a}", f"{diffusers}.{b}") for a, b in leaves]


# --- configs from shapes --------------------------------------------------------------------------------


def unet_config(sd: Mapping[str, torch.Tensor], added_pooled_dim: int | None = None, **heads) -> UNetConfig:
    """The UNet's sizes from its shapes; `heads` (num_heads= / head_dim=) is the family's choice, and so is
    the width of the pooled text embedding in an added condition (SDXL: the text projection's)."""
    p = UNET_ROOT
    conv_in = get(sd, p + "input_blocks.0.0.weight", 4)  # (channels[0], in_channels, 3, 3)
    n, levels = _unet_layout(sd)
    first_blocks = [1 + level * (n + 1) for level in range(levels)]  # the first block of each level
    channels = tuple(get(sd, f"{p}input_blocks.{b}.0.out_layers.3.weight", 4).shape[0] for b in first_blocks)
    attention = tuple(f"{p}input_blocks.{b}.1.proj_in.weight" in sd for b in first_blocks)
    mid = p + "middle_block.1."
    # Blocks per spatial transformer: one number where every transformer has the same (and the middle
    # block's), else one per level (SDXL base), with 1 at levels without attention as diffusers lists it.
    mid_depth = _transformer_depth(sd, mid)
    depths = [_transformer_depth(sd, f"{p}input_blocks.{b}.1.") if a else 1 for b, a in zip(first_blocks, attention)]
    attended = {d for d, a in zip(depths, attention) if a} | {mid_depth}
    depth = attended.pop() if len(attended) == 1 else tuple(depths)
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=get(sd, p + "out.2.weight", 4).shape[0],
        channels=channels,
        attention_levels=attention,
        layers_per_block=n,
        context_dim=get(sd, mid + "transformer_blocks.0.attn2.to_k.weight", 2).shape[1],
        transformer_depth=depth,
        use_linear_projection=get(sd, mid + "proj_in.weight", (2, 4)).ndim == 2,
        **_added_condition(sd, added_pooled_dim),
        **heads,
    )


def _transformer_depth(sd: Mapping[str, torch.Tensor], transformer: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(re.escape(transformer) + r"transformer_blocks\.(\d+)\.", k))})


def _added_condition(sd: Mapping[str, torch.Tensor], pooled_dim: int | None, time_dim: int = 256) -> dict:
    """SDXL's `label_emb` (the MLP of the added vector): its input width is the pooled text embedding's
    (`pooled_dim`, the family's) + 256 Fourier features per size number."""
    key = UNET_ROOT + "label_emb.0.0.weight"
    if key not in sd or pooled_dim is None:
        return {}
    input_dim = get(sd, key, 2).shape[1]
    numbers, rest = divmod(input_dim - pooled_dim, time_dim)
    if rest or numbers < 1:
        raise CheckpointError(f"unknown architecture: the weight {key!r} does not take a pooled text embedding of "
                              f"{pooled_dim} plus {time_dim} features per size number")
    return {"added_condition": "text_time", "added_input_dim": input_dim, "added_time_ids": numbers,
            "added_time_dim": time_dim}


def _unet_layout(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(layers_per_block, levels): with n ResBlocks per level and a downsampling block between levels,
    the input blocks are conv_in, then n blocks, op, n blocks, op, ..., n blocks."""
    blocks = indices(sd, UNET_ROOT + "input_blocks.")
    ops = sorted(b for b in blocks if UNET_ROOT + f"input_blocks.{b}.0.op.weight" in sd)
    count = max(blocks) + 1
    n = ops[0] - 1 if ops else count - 1
    levels = len(ops) + 1
    if n < 1 or count != 1 + levels * n + len(ops) or ops != [(i + 1) * (n + 1) for i in range(len(ops))]:
        raise CheckpointError(
            f"unknown UNet layout: {count} input blocks with downsampling at {ops} do not form levels of equal "
            f"size"
        )
    return n, levels


def vae_config(sd: Mapping[str, torch.Tensor], **fixed) -> VAEConfig:
    """The VAE's sizes from its shapes; `fixed` (scaling_factor=...) is the family's choice."""
    p = VAE_ROOT + "encoder.down."
    levels = count_indices(sd, p)
    layers = count_indices(sd, p + "0.block.")
    return VAEConfig(
        in_channels=get(sd, VAE_ROOT + "encoder.conv_in.weight", 4).shape[1],
        out_channels=get(sd, VAE_ROOT + "decoder.conv_out.weight", 4).shape[0],
        latent_channels=get(sd, VAE_ROOT + "decoder.conv_in.weight", 4).shape[1],
        channels=tuple(get(sd, f"{p}{i}.block.0.conv1.weight", 4).shape[0] for i in range(levels)),
        layers_per_block=layers,
        **fixed,
    )


# --- prediction -----------------------------------------------------------------------------------------


def stated_prediction(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str | None:
    """What the file says it predicts ("epsilon" / "v_prediction"), or None when it does not say."""
    stated = metadata.get("prediction_type") or metadata.get("modelspec.prediction_type")
    if stated:
        return _normalize_prediction(stated)
    if any(k in sd for k in V_PRED_MARKERS):
        return "v_prediction"
    return None


def _normalize_prediction(value: str) -> str:
    value = value.strip().lower()
    if value in ("epsilon", "eps"):
        return "epsilon"
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    raise CheckpointError("the checkpoint's metadata names an unknown prediction_type; expected 'epsilon' or 'v'")


# --- shape helpers --------------------------------------------------------------------------------------


def get(sd: Mapping[str, torch.Tensor], key: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """The weight `key`, checked to have `ndim` dimensions (one of them, for a tuple)."""
    if key not in sd:
        raise CheckpointError(f"unknown architecture: the weight {key!r} is missing")
    ndims = ndim if isinstance(ndim, tuple) else (ndim,)
    if sd[key].ndim not in ndims:
        raise CheckpointError(
            f"unknown architecture: the weight {key!r} has {sd[key].ndim} dimensions where a Stable "
            f"Diffusion checkpoint has {' or '.join(map(str, ndims))}"
        )
    return sd[key]


def block_index(key: str, prefix: str) -> int:
    """N in `prefix + "N.rest"`; a `CheckpointError` unless N is a small non-negative integer."""
    part = key[len(prefix):].split(".", 1)[0]
    if not _BLOCK_NUMBER.fullmatch(part):
        raise CheckpointError(
            f"unknown architecture: a key under {prefix!r} has a block number that is not a small integer"
        )
    return int(part)


def indices(sd: Mapping[str, torch.Tensor], prefix: str) -> set[int]:
    """The numbers N of the sub-modules `prefix + "N."` (a non-numeric N is an error)."""
    return {block_index(k, prefix) for k in sd if k.startswith(prefix)}


def count_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered sub-modules `prefix.N.` there are (N contiguous from 0)."""
    found = indices(sd, prefix)
    if not found or found != set(range(len(found))):
        what = "none" if not found else "not numbered 0..N-1"
        raise CheckpointError(f"unknown architecture: the layers under {prefix!r} are {what}")
    return len(found)


def keymaps(config, text_encoder: KeyMap) -> dict[str, KeyMap]:
    """The single-file key maps of an SD 1.x/2.x model: the LDM UNet and VAE tables, and the family's text
    encoder map."""
    return {"unet": unet_keymap(config.unet), "vae": vae_keymap(config.vae), "text_encoder": text_encoder}
