"""Where each weight of the original single-file layout lives in the diffusers layout, as data.

The original layout is the one of CompVis' latent-diffusion code (Rombach et al. 2022) that Stability's
`.ckpt`/`.safetensors` releases use: one flat state dict with the UNet under `model.diffusion_model.`, the VAE
under `first_stage_model.` and the text encoder under `cond_stage_model.`. sdlab's networks use the diffusers
names, so loading or writing such a file is a renaming.

A `KeyMap` is a list of (original, diffusers) pairs of *prefixes* that end on a `.` boundary: a key is renamed
by its longest listed prefix, the rest of the key is kept (`input_blocks.1.1.proj_in.weight` ->
`down_blocks.0.attentions.0.proj_in.weight`). The pairs are generated from the config by enumerating levels
and blocks, so non-standard sizes work; the names themselves are plain literals below.

Two things are not renamings, and are listed separately:
- `fused_qkv`: OpenCLIP stores each attention's query/key/value projections as one (3*width, width) matrix
  `in_proj_weight` (and `in_proj_bias`); diffusers has `q_proj`, `k_proj`, `v_proj`.
- `conv1x1`: the VAE's mid-block attention uses 1x1 convolutions, (C, C, 1, 1), where diffusers uses Linear
  layers, (C, C).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

Pair = tuple[str, str]  # (original prefix, diffusers prefix)

UNET_ROOT = "model.diffusion_model."
VAE_ROOT = "first_stage_model."
CLIP_ROOT = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP through transformers, diffusers names
OPENCLIP_ROOT = "cond_stage_model.model."  # SD 2.x: OpenCLIP's own names

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

OPENCLIP_GLOBALS: list[Pair] = [
    ("token_embedding", "text_model.embeddings.token_embedding"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),  # a bare Parameter in OpenCLIP
    ("ln_final", "text_model.final_layer_norm"),
]
OPENCLIP_LAYER: list[Pair] = [
    ("ln_1", "layer_norm1"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
OPENCLIP_FUSED_QKV = ("q_proj", "k_proj", "v_proj")  # the order of the three blocks of in_proj_weight

# Original keys that hold no weight sdlab uses. position_ids is a constant buffer (0..76) that old
# transformers versions saved; OpenCLIP's projection to the joint image-text space and its contrastive
# temperature are unused by SD, which conditions on per-token hidden states; `visual` is the image tower.
IGNORED_KEYS = (
    CLIP_ROOT + "text_model.embeddings.position_ids",
    OPENCLIP_ROOT + "text_projection",
    OPENCLIP_ROOT + "logit_scale",
    OPENCLIP_ROOT + "attn_mask",
)
IGNORED_PREFIXES = (OPENCLIP_ROOT + "visual.", VAE_ROOT + "loss.")


@dataclass(frozen=True)
class KeyMap:
    """How one network's weights are named in the original layout (`root` + pairs) and in diffusers."""

    root: str  # the prefix of all of this network's keys in the original file
    pairs: tuple[Pair, ...]
    fused_qkv: tuple[Pair, ...] = ()  # (original `...attn.in_proj` stem, diffusers attention module)
    conv1x1: frozenset[str] = frozenset()  # diffusers Linear modules stored as 1x1 convolutions


def keymaps(config: ModelConfig, *, openclip: bool | None = None) -> dict[str, KeyMap]:
    """The key maps of the three networks of `config`, by diffusers component name.

    The text encoder is OpenCLIP-named when `openclip` is true; by default when its activation is GELU (SD 2.x).
    """
    if openclip is None:
        openclip = config.text_encoder.activation == "gelu"
    text = openclip_keymap(config.text_encoder) if openclip else clip_keymap(config.text_encoder)
    return {"unet": unet_keymap(config.unet), "vae": vae_keymap(config.vae), "text_encoder": text}


# --- UNet -----------------------------------------------------------------------------------------------


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


# --- VAE ------------------------------------------------------------------------------------------------


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
    return KeyMap(VAE_ROOT, tuple(pairs), conv1x1=conv1x1)


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


# --- text encoders --------------------------------------------------------------------------------------


def clip_keymap(cfg: TextEncoderConfig) -> KeyMap:
    """SD 1.x keeps transformers' CLIPTextModel names under `cond_stage_model.transformer.`."""
    pairs = [
        ("text_model.embeddings.token_embedding", "text_model.embeddings.token_embedding"),
        ("text_model.embeddings.position_embedding", "text_model.embeddings.position_embedding"),
        *[(f"text_model.encoder.layers.{i}", f"text_model.encoder.layers.{i}") for i in range(cfg.num_layers)],
        ("text_model.final_layer_norm", "text_model.final_layer_norm"),
    ]
    return KeyMap(CLIP_ROOT, tuple(pairs))


def openclip_keymap(cfg: TextEncoderConfig) -> KeyMap:
    """SD 2.x keeps OpenCLIP's own names under `cond_stage_model.model.`. Only the first `num_layers`
    resblocks are mapped; a 24th (SD 2 conditions on the penultimate layer) is left out, as diffusers does."""
    pairs = list(OPENCLIP_GLOBALS)
    fused = []
    for i in range(cfg.num_layers):
        ours = f"text_model.encoder.layers.{i}"
        pairs += [(f"transformer.resblocks.{i}.{a}", f"{ours}.{b}") for a, b in OPENCLIP_LAYER]
        fused.append((f"transformer.resblocks.{i}.attn.in_proj", f"{ours}.self_attn"))
    return KeyMap(OPENCLIP_ROOT, tuple(pairs), fused_qkv=tuple(fused))
