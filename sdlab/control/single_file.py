"""ControlNet single files (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") read into diffusers' `ControlNetModel` config and key names.

A ControlNet is a trainable copy of the UNet's encoder and middle block, plus three things of its own: the
hint encoder (`input_hint_block`: 8 convolutions with SiLUs between them, image -> latent-sized features),
one zero-initialised 1x1 convolution per encoder block (`zero_convs.N.0`) and one after the middle block
(`middle_block_out.0`). Two single-file layouts exist:

    original   lllyasviel's `control_v11p_sd15_canny.pth` / `.safetensors` and the SD 2.x / SDXL ones made
               with the same code: keys under `control_model.` (`control_sd15_*.pth` also carry the whole
               SD model under `model.diffusion_model.` etc., which is ignored), or the same keys without
               the prefix (thibaud's SD 2.1 ControlNets).
    diffusers  `diffusion_pytorch_model.safetensors` copied out of a diffusers folder (xinsir's and
               diffusers' SDXL ControlNets): `controlnet_cond_embedding.*`, `controlnet_down_blocks.N.*`.

Both are read into one config (the dict a diffusers `config.json` would hold, without its `_class_name` /
`_diffusers_version` entries, so that `ControlNetModel(**config)` takes it) and one diffusers-named state dict.
The key map is data: `controlnet_keymap(config)` lists (original prefix, diffusers prefix) pairs, built
from the UNet encoder/middle tables of `sdlab.families.ldm` plus this module's own tables, and applied by
`sdlab.checkpoints.convert` (which reports every unexpected or missing key).

What the weights do not say comes from elsewhere:
  * attention heads and the added-condition Fourier width: the family, found by the context width
    (`FAMILIES`: SD 1.x 768 -> 8 heads; SD 2.x 1024 and SDXL 2048 -> heads of 64 channels; SDXL's
    `text_time` embedding turns each size number into 256 features), or a `ControlFamily` passed in;
  * `global_pool_conditions` (the shuffle ControlNet averages its residuals over space): from the file
    name, as sd-webui-controlnet does (`scripts/controlnet_model_guess.py`: "shuffle" in the lower-cased
    file stem, for files without `label_emb`, i.e. not SDXL);
  * `upcast_attention` (False), the GroupNorm groups (32), the hint's channel order ("rgb").

Not read (each a `CheckpointError` that says so): Control-LoRA (`lora_controlnet`), "difference"
ControlNets (weights relative to a UNet), ControlNet-Union (`control_add_embedding`, `task_embedding`), and
spatial transformers with no transformer block (diffusers' -mid / -small SDXL ControlNets), which sdlab's
UNet config does not describe.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.configs import unet_to_diffusers
from ..checkpoints.convert import _component_to_diffusers, _component_to_ldm
from ..checkpoints.io import quoted_key, read_state_dict
from ..config import UNetConfig
from ..errors import CheckpointError, ParameterError
from ..families import ldm, sd1, sd2, sdxl
from ..families.base import KeyMap, Pair

StateDict = dict[str, torch.Tensor]

CONTROL_ROOT = "control_model."  # the ControlNet's keys in lllyasviel's files (cldm's ControlLDM.control_model)
CROSS, PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
SHUFFLE = "shuffle"  # a file stem containing it (any case) is a shuffle ControlNet: global pooling

# Keys that mark each layout (after the `control_model.` prefix is removed).
ORIGINAL_MARKERS = ("time_embed.0.weight", "input_blocks.0.0.weight", "input_hint_block.0.weight",
                    "zero_convs.0.0.weight")
DIFFUSERS_MARKERS = ("time_embedding.linear_1.weight", "conv_in.weight", "controlnet_cond_embedding.conv_in.weight",
                     "controlnet_down_blocks.0.weight")
# ControlNet variants these files can hold and sdlab does not read: marker key -> what it is.
UNSUPPORTED = {
    "lora_controlnet": "a Control-LoRA (Stability's low-rank ControlNet, applied on top of a UNet)",
    "difference": "a 'difference' ControlNet (weights stored relative to a UNet's)",
    "control_add_embedding.linear_1.weight": "a ControlNet-Union (several control types in one network)",
    "task_embedding": "a ControlNet-Union (several control types in one network)",
}

# The ControlNet's own layers beside the UNet encoder and middle copied from `sdlab.families.ldm`.
STEM: list[Pair] = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("middle_block_out.0", "controlnet_mid_block"),
]
ADDED: list[Pair] = [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
HINT_IN, HINT_OUT = "controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.conv_out"

# The ControlNetModel arguments no single file varies (diffusers' defaults, which every published
# ControlNet config.json of SD 1.x/2.x/SDXL repeats).
FIXED = {
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers puts the head count in attention_head_dim
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "controlnet_conditioning_channel_order": "rgb",
    "addition_embed_type_num_heads": 64,
}


# --- families: what the shapes cannot tell -------------------------------------------------------------


@dataclass(frozen=True)
class ControlFamily:
    """What a ControlNet's weights do not say, by the family of the UNet it controls: its attention heads
    (`num_heads` per transformer, or `head_dim` channels per head: exactly one), the Fourier features per
    size number of an SDXL-style added condition, and the GroupNorm groups. Found by `context_dim`."""

    name: str
    context_dim: int
    num_heads: int | None = None
    head_dim: int | None = None
    added_time_dim: int = 256
    norm_groups: int = 32

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ParameterError(f"ControlFamily {self.name!r}: give exactly one of num_heads and head_dim")

    @classmethod
    def of_unet(cls, name: str, unet: UNetConfig) -> ControlFamily:
        """The rule of a family's UNet preset (a ControlNet copies that UNet's encoder)."""
        return cls(name, unet.context_dim, num_heads=unet.num_heads, head_dim=unet.head_dim,
                   added_time_dim=unet.added_time_dim, norm_groups=unet.norm_groups)


FAMILIES: tuple[ControlFamily, ...] = (
    ControlFamily.of_unet("sd1", sd1.SD15.unet),  # 8 heads at every level, 768-wide context
    ControlFamily.of_unet("sd2", sd2.SD21_BASE.unet),  # heads of 64 channels, 1024-wide context
    ControlFamily.of_unet("sdxl", sdxl.SDXL_BASE.unet),  # heads of 64 channels, 2048-wide context
)


def family_for(context_dim: int, family: ControlFamily | None = None) -> ControlFamily:
    """The family whose UNet has this context width (`family` when given)."""
    if family is not None:
        return family
    for known in FAMILIES:
        if known.context_dim == context_dim:
            return known
    names = ", ".join(f"{f.name} {f.context_dim}" for f in FAMILIES)
    raise CheckpointError(f"a ControlNet with a {context_dim}-wide text context is of no known family ({names}); "
                          f"pass family=ControlFamily(...) with its attention heads")


# --- public API -----------------------------------------------------------------------------------------


def read_controlnet_file(path, *, family: ControlFamily | None = None) -> tuple[dict, StateDict]:
    """(diffusers ControlNetModel config, diffusers-named state dict) of a ControlNet single file in the
    original or the diffusers layout. Errors (`CheckpointError`) name the file."""
    path = Path(path)
    state_dict = read_state_dict(path)  # safe for .safetensors/.pth/.ckpt: never unpickles code
    try:
        original = _original_view(state_dict)
        config = controlnet_config_from_original(original, family=family)
        converted = convert_original_controlnet(original, config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not config["addition_embed_type"]:  # sd-webui-controlnet's rule, for SD 1.x/2.x files only
        config["global_pool_conditions"] = SHUFFLE in path.stem.lower()
    return config, converted


def controlnet_config_from_original(state_dict: Mapping[str, torch.Tensor], *,
                                    family: ControlFamily | None = None) -> dict:
    """The diffusers ControlNetModel config of an original-layout ControlNet (`control_model.` prefix or
    none), sizes read off its shapes, heads from its family. `global_pool_conditions` is False: the file
    name says otherwise (`read_controlnet_file`)."""
    sd = _control_part(state_dict)
    unet = _unet_config(sd, family)
    config = {k: v for k, v in unet_to_diffusers(unet, 64).items() if k in UNET_FIELDS}
    return {
        **FIXED,
        **config,
        "conditioning_channels": ldm.get(sd, "input_hint_block.0.weight", 4).shape[1],
        "conditioning_embedding_out_channels": _hint_channels(sd),
        "upcast_attention": False,  # not in the weights; the published ControlNet configs say False
        **_added_config(sd, unet.context_dim, family),
        "global_pool_conditions": False,
    }


def convert_original_controlnet(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> StateDict:
    """Original-layout ControlNet keys -> diffusers ControlNetModel keys (tensors passed through, not
    copied). `config` (None: read off the shapes) gives the layout; every key must find its place and
    every place its key, else `CheckpointError` lists them; the widths that carry the config are checked."""
    sd = _control_part(state_dict)
    config = controlnet_config_from_original(sd) if config is None else config
    keymap = controlnet_keymap(config)
    out = _component_to_diffusers(sd, keymap, "ControlNet")
    check_keys(out, expected_keys(keymap, config))
    check_shapes(out, config)
    return out


def controlnet_keymap(config: Mapping) -> KeyMap:
    """(original prefix, diffusers prefix) pairs of a ControlNet of this config (root: the unprefixed keys)."""
    levels = _Levels(tuple(config["block_out_channels"]), tuple(t == CROSS for t in config["down_block_types"]),
                     config["layers_per_block"])
    pairs = [
        *STEM,
        *ldm._unet_encoder(levels),
        *ldm._unet_middle(levels),
        *_zero_convs(levels),
        *_hint_block(len(config["conditioning_embedding_out_channels"])),
        *(ADDED if config.get("addition_embed_type") else []),
    ]
    return KeyMap("", tuple(pairs))


# --- layouts --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Levels:
    """The part of a UNet config that its key tables read (`ldm._unet_encoder` / `_unet_middle`)."""

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    layers_per_block: int


def _zero_convs(levels: _Levels) -> list[Pair]:
    """One zero conv per encoder block (input_blocks.0 ... and every downsampler), in execution order."""
    blocks = 1 + len(levels.channels) * levels.layers_per_block + len(levels.channels) - 1
    return [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(blocks)]


def _hint_block(levels: int) -> list[Pair]:
    """input_hint_block: conv_in, then two convs per width step (the second strided), then conv_out; a SiLU
    (no weights) sits at every odd index. lllyasviel's widths 16, 32, 96, 256 give indices 0, 2, ..., 14."""
    blocks = 2 * (levels - 1)
    pairs = [("input_hint_block.0", HINT_IN)]
    pairs += [(f"input_hint_block.{2 * (i + 1)}", f"controlnet_cond_embedding.blocks.{i}") for i in range(blocks)]
    return pairs + [(f"input_hint_block.{2 * (blocks + 1)}", HINT_OUT)]


def _original_view(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The ControlNet's weights under original names, whichever layout the file has."""
    sd = _control_part(state_dict, strict=False)
    _refuse_variants(sd)
    if all(k in sd for k in ORIGINAL_MARKERS):
        return sd
    if all(k in sd for k in DIFFUSERS_MARKERS):
        return _diffusers_to_original(sd)
    raise CheckpointError(
        f"not a ControlNet: expected original-layout keys such as {[CONTROL_ROOT + k for k in ORIGINAL_MARKERS[:3]]} "
        f"or diffusers keys such as {list(DIFFUSERS_MARKERS[2:])}; found neither (e.g. {_examples(sd)})")


def _control_part(state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> StateDict:
    """The ControlNet's keys without the `control_model.` prefix; files that have it may carry the whole
    SD model beside it (`model.diffusion_model.`, `first_stage_model.`, ...), which is dropped."""
    if any(k.startswith(CONTROL_ROOT) for k in state_dict):
        return {k[len(CONTROL_ROOT):]: v for k, v in state_dict.items() if k.startswith(CONTROL_ROOT)}
    if strict and "input_hint_block.0.weight" not in state_dict:
        raise CheckpointError(f"not an original-layout ControlNet: no {CONTROL_ROOT}input_hint_block.0.weight "
                              f"(nor input_hint_block.0.weight); found e.g. {_examples(state_dict)}")
    return dict(state_dict)


def _refuse_variants(sd: Mapping[str, torch.Tensor]) -> None:
    for marker, what in UNSUPPORTED.items():
        if marker in sd:
            raise CheckpointError(f"{what}: sdlab reads plain ControlNets only (the key {marker!r} marks it)")


def _diffusers_to_original(sd: StateDict) -> StateDict:
    """Diffusers-named weights renamed to the original names (the inverse of the same table), so that one
    reader takes the config off the shapes. The table needs the level layout, which the keys give."""
    levels = count(sd, "down_blocks.")
    per_block = count(sd, "down_blocks.0.resnets.")
    channels = tuple(ldm.get(sd, f"down_blocks.{i}.resnets.0.conv2.weight", 4).shape[0] for i in range(levels))
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels)]
    layout = {
        "block_out_channels": channels, "layers_per_block": per_block,
        "down_block_types": [CROSS if a else PLAIN for a in attention],
        "conditioning_embedding_out_channels": [0] * (count(sd, "controlnet_cond_embedding.blocks.") // 2 + 1),
        "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in sd else None,
    }
    return _component_to_ldm(sd, controlnet_keymap(layout), "ControlNet")


# --- config from shapes ---------------------------------------------------------------------------------

# The UNet2DConditionModel config entries that a ControlNetModel config shares.
UNET_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
               "attention_head_dim", "transformer_layers_per_block", "use_linear_projection", "norm_num_groups")


def _unet_config(sd: StateDict, family: ControlFamily | None) -> UNetConfig:
    """The copied UNet encoder's sizes, read by `ldm.unet_config` off the keys as a UNet's. A ControlNet
    has no output convolution, the one weight that reader needs beyond the encoder and middle (for
    `out_channels`, which a ControlNet config lacks): a meta-device stand-in takes its place."""
    _refuse_empty_transformers(sd)
    view = {ldm.UNET_ROOT + k: v for k, v in sd.items()}
    conv_in = ldm.get(sd, "input_blocks.0.0.weight", 4)  # (channels[0], in_channels, 3, 3)
    view[ldm.UNET_ROOT + "out.2.weight"] = torch.empty(conv_in.shape[1], conv_in.shape[0], 3, 3, device="meta")
    context = ldm.get(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2).shape[1]
    rule = family_for(context, family)
    heads = {"num_heads": rule.num_heads, "head_dim": rule.head_dim}
    try:
        unet = ldm.unet_config(view, **heads)
        return dataclasses.replace(unet, norm_groups=rule.norm_groups)
    except ParameterError as e:  # shapes that give no valid UNet (heads that do not divide a width, ...)
        raise CheckpointError(f"the ControlNet's shapes do not form a {rule.name} UNet encoder: {e}") from None


def _refuse_empty_transformers(sd: StateDict) -> None:
    """Spatial transformers with no transformer block (norm and projections only: diffusers' -mid and
    -small SDXL ControlNets) have no UNetConfig to describe them."""
    transformers = {k.removesuffix("proj_in.weight") for k in sd if k.endswith(".1.proj_in.weight")}
    empty = sorted(t for t in transformers if not any(k.startswith(t + "transformer_blocks.0.") for k in sd))
    if empty:
        raise CheckpointError(f"spatial transformers without transformer blocks ({empty[0]}...: a 'mid' or 'small' "
                              f"SDXL ControlNet) are not supported; sdlab reads ControlNets with 1 to 16 blocks "
                              f"per transformer")


def _hint_channels(sd: StateDict) -> list[int]:
    """The hint encoder's widths: conv_in's, then every second block's (the strided ones widen)."""
    found = sorted(ldm.indices(sd, "input_hint_block."))
    if len(found) < 2 or found != list(range(0, 2 * len(found), 2)) or len(found) % 2:
        raise CheckpointError(f"the hint encoder's convolutions are input_hint_block.{found}; expected 0, 2, ..., "
                              f"4k + 2 (lllyasviel's: 0..14)")
    widths = [ldm.get(sd, "input_hint_block.0.weight", 4).shape[0]]
    strided = found[2:-1:2]  # 4, 8, 12: the second conv of each width step
    return widths + [ldm.get(sd, f"input_hint_block.{i}.weight", 4).shape[0] for i in strided]


def _added_config(sd: StateDict, context_dim: int, family: ControlFamily | None) -> dict:
    """SDXL's `label_emb` (the MLP of pooled text + Fourier features of the size numbers)."""
    if "label_emb.0.0.weight" not in sd:
        return {"addition_embed_type": None, "addition_time_embed_dim": None,
                "projection_class_embeddings_input_dim": None}
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": family_for(context_dim, family).added_time_dim,
        "projection_class_embeddings_input_dim": ldm.get(sd, "label_emb.0.0.weight", 2).shape[1],
    }


# --- keys and shapes ------------------------------------------------------------------------------------

# The weights inside one spatial transformer (diffusers' Transformer2DModel) and each of its blocks; the
# key map renames whole transformers, so a missing leaf would otherwise pass unseen.
TRANSFORMER_LEAVES = ("norm", "proj_in", "proj_out")
BLOCK_LEAVES = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
BLOCK_UNBIASED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")


def expected_keys(keymap: KeyMap, config: Mapping) -> set[str]:
    """Every diffusers key a ControlNet of this config has: weight and bias of each mapped layer, and the
    leaves of each spatial transformer, as deep as the config says."""
    depth = config["transformer_layers_per_block"]
    depths = depth if isinstance(depth, (list, tuple)) else [depth] * len(config["block_out_channels"])
    keys = set()
    for _, module in keymap.pairs:
        if m := re.fullmatch(r"(?:down_blocks\.(\d+)|mid_block)\.attentions\.\d+", module):
            keys |= _transformer_keys(module, depths[int(m[1])] if m[1] is not None else depths[-1])
        else:
            keys |= {module + ".weight", module + ".bias"}
    return keys


def _transformer_keys(module: str, depth: int) -> set[str]:
    keys = {f"{module}.{leaf}.{kind}" for leaf in TRANSFORMER_LEAVES for kind in ("weight", "bias")}
    for i in range(depth):
        block = f"{module}.transformer_blocks.{i}"
        keys |= {f"{block}.{leaf}.{kind}" for leaf in BLOCK_LEAVES for kind in ("weight", "bias")}
        keys |= {f"{block}.{leaf}.weight" for leaf in BLOCK_UNBIASED}
    return keys


def check_keys(sd: Mapping[str, torch.Tensor], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights, e.g. {[quoted_key(k) for k in unexpected[:4]]}")
    if missing:
        problems.append(f"{len(missing)} expected weights are absent, e.g. {missing[:4]}")
    if problems:
        raise CheckpointError("the ControlNet's weights do not match its layout: " + "; ".join(problems))



def check_shapes(sd: Mapping[str, torch.Tensor], config: Mapping) -> None:
    """The weights whose widths the config rests on have the shapes it implies (a file whose blocks
    disagree with each other is refused here rather than failing inside a layer)."""
    wrong = [(k, tuple(sd[k].shape), shape) for k, shape in expected_shapes(config).items()
             if k in sd and tuple(sd[k].shape) != shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(f"inconsistent ControlNet shapes: {len(wrong)} weights disagree with the layout the "
                              f"others give, e.g. {key!r} is {got}, expected {want}")


def expected_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """(diffusers key -> shape) of the convolutions and linears that carry the widths."""
    ch, cond = list(config["block_out_channels"]), list(config["conditioning_embedding_out_channels"])
    emb = 4 * ch[0]  # the time embedding's width
    shapes = {
        "conv_in.weight": (ch[0], config["in_channels"], 3, 3),
        "time_embedding.linear_1.weight": (emb, ch[0]),
        "time_embedding.linear_2.weight": (emb, emb),
        f"{HINT_IN}.weight": (cond[0], config["conditioning_channels"], 3, 3),
        f"{HINT_OUT}.weight": (ch[0], cond[-1], 3, 3),
        "controlnet_mid_block.weight": (ch[-1], ch[-1], 1, 1),
    }
    for i, (a, b) in enumerate(zip(cond[:-1], cond[1:])):
        shapes[f"controlnet_cond_embedding.blocks.{2 * i}.weight"] = (a, a, 3, 3)
        shapes[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"] = (b, a, 3, 3)
    for i, width in enumerate(_block_widths(ch, config["layers_per_block"])):
        shapes[f"controlnet_down_blocks.{i}.weight"] = (width, width, 1, 1)
    if config.get("addition_embed_type"):
        shapes["add_embedding.linear_1.weight"] = (emb, config["projection_class_embeddings_input_dim"])
        shapes["add_embedding.linear_2.weight"] = (emb, emb)
    return shapes | _encoder_shapes(config, emb)


def _encoder_shapes(config: Mapping, emb: int) -> dict[str, tuple[int, ...]]:
    ch, n, context = list(config["block_out_channels"]), config["layers_per_block"], config["cross_attention_dim"]
    shapes, in_ch = {}, ch[0]
    for level, width in enumerate(ch):
        for j in range(n):
            p = f"down_blocks.{level}.resnets.{j}."
            shapes |= {p + "conv1.weight": (width, in_ch, 3, 3), p + "conv2.weight": (width, width, 3, 3),
                       p + "time_emb_proj.weight": (width, emb)}
            shapes[f"down_blocks.{level}.attentions.{j}.transformer_blocks.0.attn2.to_k.weight"] = (width, context)
            in_ch = width
        shapes[f"down_blocks.{level}.downsamplers.0.conv.weight"] = (width, width, 3, 3)
    shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = (ch[-1], context)
    return shapes


def _block_widths(channels: list[int], per_block: int) -> list[int]:
    """The width of each encoder block's output (conv_in, ResBlocks, downsamplers), in execution order."""
    widths = [channels[0]]
    for level, width in enumerate(channels):
        widths += [width] * per_block + ([width] if level < len(channels) - 1 else [])
    return widths


# --- helpers --------------------------------------------------------------------------------------------


def count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return ldm.count_indices(sd, prefix)


def _examples(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)[:3]
    return ", ".join(quoted_key(k) for k in keys) if keys else "no tensors at all"
