"""IP-Adapter: an image as a prompt, through a second, decoupled cross-attention (Ye et al. 2023, "IP-Adapter:
Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models").

A CLIP image encoder (`sdlab.nn.clip_vision`) reads the reference image; an image projection turns its
features into N tokens of the UNet's context width D; every cross-attention of the UNet gets its own key and
value projections for those tokens (`to_k_ip`, `to_v_ip`) and adds scale * Attn(q, K_ip, V_ip) to its text
attention (eq. 5 of the paper). Three projections, chosen by the file's keys:

- plain ("ip-adapter_sd15", "ip-adapter_sdxl"): Linear + LayerNorm of the projected image embedding, 4 tokens;
- plus ("ip-adapter-plus*"): a Perceiver resampler (Jaegle et al. 2021; Alayrac et al. 2022, Flamingo) of the
  encoder's penultimate hidden states into 16 learned query tokens;
- full ("ip-adapter-full-face"): an MLP + LayerNorm on each of the 257 penultimate hidden states.

The projections' module names are those of diffusers (`ImageProjection`, `IPAdapterPlusImageProjection`,
`IPAdapterFullImageProjection`); the files keep the original repository's names, converted by the tables
below. The cross-attention weights are numbered as diffusers numbers the UNet's attention processors: all
self- and cross-attentions counted, down blocks, then up blocks, then the middle block (diffusers' module
registration order, not sdlab's), so the cross-attentions are keys "1.", "3.", "5.", ...

The UNet keeps its signature: the image tokens are appended to the text context, (B, T_text + N, D), and
`ip_adapter_attention(unet, adapter, scale)` makes its cross-attentions split them off (`layers.IPAttention`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdlab.checkpoints.io import _check_torch_zip, _safe_torch_load, quoted_key, read_checkpoint
from sdlab.errors import CheckpointError, ParameterError
from sdlab.nn.clip_vision import CLIPVisionEncoder, clip_image_pixels, load_strict
from sdlab.nn.layers import Attention, IPAttention, TransformerBlock, attention

log = logging.getLogger(__name__)

KINDS = ("plain", "plus", "full")
RESAMPLER_HEAD_DIM = 64  # fixed in the original Resampler and in diffusers' loader (heads = to_q rows / 64)
FULL_TOKENS = 257  # the full projection keeps every encoder token: 16 x 16 patches + the class token


@dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver resampler of IP-Adapter plus (diffusers' IPAdapterPlusImageProjection)."""

    width: int = 1280  # of the latent queries ("hidden_dims")
    depth: int = 4
    heads: int = 20
    head_dim: int = RESAMPLER_HEAD_DIM
    ff_width: int = 5120  # width * ffn_ratio


@dataclass(frozen=True)
class IPAdapterConfig:
    """What an IP-Adapter file holds, read from its shapes (`config_from_state_dict`)."""

    kind: str  # one of KINDS
    image_dim: int  # plain: the encoder's projection_dim P; plus/full: its hidden width W
    context_dim: int  # D: the UNet's cross-attention (context) width
    num_tokens: int  # N image tokens per reference image
    attention_widths: tuple[int, ...]  # inner width of each UNet cross-attention, in diffusers' order
    resampler: ResamplerConfig | None = None  # plus only

    @property
    def uses_hidden_states(self) -> bool:
        """plus and full read the encoder's penultimate tokens; plain its projected class token."""
        return self.kind != "plain"


# --- image projections (diffusers' module names) ---------------------------------------------------------------


class ImageProjection(nn.Module):
    """Plain IP-Adapter: image_embeds (B, P) -> Linear to N * D -> (B, N, D) -> LayerNorm."""

    def __init__(self, image_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(embeds.to(self.image_embeds.weight.dtype))  # (B, N * D)
        return self.norm(tokens.reshape(embeds.shape[0], self.num_tokens, -1))  # (B, N, D)


class GELUFeedForward(nn.Module):
    """Linear -> exact GELU -> Linear; `net` is (GELU projection, dropout slot, Linear) for diffusers' names."""

    def __init__(self, dim: int, inner: int, out: int, bias: bool):
        super().__init__()
        self.net = nn.Sequential(_GELUProjection(dim, inner, bias), nn.Identity(), nn.Linear(inner, out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FullImageProjection(nn.Module):
    """IP-Adapter full: each hidden state (B, T, W) -> MLP -> LayerNorm -> (B, T, D)."""

    def __init__(self, image_dim: int, context_dim: int):
        super().__init__()
        self.ff = GELUFeedForward(image_dim, image_dim, context_dim, bias=True)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.ff(hidden.to(self.norm.weight.dtype)))


class ResamplerAttention(nn.Module):
    """Perceiver attention: the latent queries attend to [image tokens; latents]; no biases anywhere."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, width, bias=False)])  # a list for the key "to_out.0"

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents (B, N, width), context (B, T + N, width) -> (B, N, width)."""
        out = attention(self.to_q(latents), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class ResamplerBlock(nn.Module):
    """latents + attn(ln1(latents), [ln0(x); ln1(latents)]), then + ff(latents) (diffusers' naming)."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.ln0 = nn.LayerNorm(cfg.width)
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = ResamplerAttention(cfg.width, cfg.heads, cfg.head_dim)
        self.ff = nn.Sequential(nn.LayerNorm(cfg.width),
                                GELUFeedForward(cfg.width, cfg.ff_width, cfg.width, bias=False))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: projected image tokens (B, T, width), latents (B, N, width) -> (B, N, width)."""
        normed = self.ln1(latents)
        latents = self.attn(normed, torch.cat([self.ln0(x), normed], dim=1)) + latents
        return self.ff(latents) + latents


class PlusImageProjection(nn.Module):
    """IP-Adapter plus: hidden states (B, T, W) -> N learned queries resampled from them -> (B, N, D)."""

    def __init__(self, image_dim: int, context_dim: int, num_tokens: int, cfg: ResamplerConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, cfg.width) / cfg.width**0.5)
        self.proj_in = nn.Linear(image_dim, cfg.width)
        self.proj_out = nn.Linear(cfg.width, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(ResamplerBlock(cfg) for _ in range(cfg.depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden.to(self.proj_in.weight.dtype))  # (B, T, width)
        latents = self.latents.expand(hidden.shape[0], -1, -1)  # (B, N, width)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))  # (B, N, D)


# --- the adapter ------------------------------------------------------------------------------------------------


class IPKeyValue(nn.Module):
    """The image key and value projections of one UNet cross-attention."""

    def __init__(self, context_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)


class IPAdapter(nn.Module):
    """image_proj plus the per-cross-attention `to_k_ip`/`to_v_ip` layers.

    `state_dict()`: `image_proj.<diffusers' projection names>` and `ip_adapter.<1, 3, 5, ...>.to_k_ip.weight`
    (the numbering of the files and of diffusers). forward(features) -> image tokens (B, N, D): features are
    the encoder's image_embeds (B, P) for plain, its penultimate hidden states (B, T, W) for plus/full.
    """

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.image_proj = _projection(cfg)
        self.ip_adapter = nn.ModuleDict(
            {str(2 * i + 1): IPKeyValue(cfg.context_dim, width) for i, width in enumerate(cfg.attention_widths)}
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(features)


def _projection(cfg: IPAdapterConfig) -> nn.Module:
    if cfg.kind == "plain":
        return ImageProjection(cfg.image_dim, cfg.context_dim, cfg.num_tokens)
    if cfg.kind == "full":
        return FullImageProjection(cfg.image_dim, cfg.context_dim)
    return PlusImageProjection(cfg.image_dim, cfg.context_dim, cfg.num_tokens, cfg.resampler)


def _check_config(cfg: IPAdapterConfig) -> None:
    if cfg.kind not in KINDS:
        raise ParameterError(f"IPAdapterConfig.kind={cfg.kind!r} is unknown; valid: {', '.join(KINDS)}")
    if (cfg.resampler is None) != (cfg.kind != "plus"):
        raise ParameterError("IPAdapterConfig: a plus adapter needs a ResamplerConfig, the others none")
    if not cfg.attention_widths:
        raise ParameterError("IPAdapterConfig.attention_widths is empty: an adapter needs one entry per UNet "
                             "cross-attention")


# --- the files --------------------------------------------------------------------------------------------------

# (original IP-Adapter repository, diffusers) name parts: prefixes of the image projection's keys.
PLAIN_KEYS = (("proj.", "image_embeds."),)
FULL_KEYS = (("proj.0.", "ff.net.0.proj."), ("proj.2.", "ff.net.2."), ("proj.3.", "norm."))
RESAMPLER_LAYER_KEYS = (  # within `layers.<i>.`; to_kv is split into to_k and to_v
    ("0.norm1.", "ln0."), ("0.norm2.", "ln1."), ("0.to_q.", "attn.to_q."), ("0.to_out.", "attn.to_out.0."),
    ("1.0.", "ff.0."), ("1.1.", "ff.1.net.0.proj."), ("1.3.", "ff.1.net.2."),
)  # fmt: skip
_RESAMPLER_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
_SECTIONS = ("image_proj", "ip_adapter")


def load_ip_adapter(path: str | os.PathLike) -> IPAdapter:
    """An IP-Adapter file as diffusers' `load_ip_adapter` reads it: a .bin holding {"image_proj": {...},
    "ip_adapter": {...}}, or a .safetensors with keys prefixed "image_proj." / "ip_adapter."."""
    path = Path(path)
    image_proj, ip = read_ip_adapter_file(path)
    try:
        cfg = config_from_state_dict(image_proj, ip)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    adapter = IPAdapter(cfg)
    state = {f"image_proj.{k}": v for k, v in convert_image_proj(image_proj, cfg.kind).items()}
    state.update({f"ip_adapter.{k}": v for k, v in ip.items()})
    load_strict(adapter, state, path)
    return adapter.eval()


def read_ip_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image_proj tensors, ip_adapter tensors) of a file, their section prefixes removed."""
    raw = read_checkpoint(path)
    tensors = raw.tensors
    if not tensors and raw.format != "safetensors":
        tensors = _nested_sections(path, raw.format)  # read_checkpoint keeps only top-level tensors
    sections = {name: {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
                for name in _SECTIONS}
    missing = [name for name in _SECTIONS if not sections[name]]
    if missing:
        raise CheckpointError(f"{path}: not an IP-Adapter file: it has no {' or '.join(missing)} tensors (expected "
                              "'image_proj.*' and 'ip_adapter.*', or a .bin with those two dictionaries)")
    others = [k for k in tensors if not k.startswith(tuple(name + "." for name in _SECTIONS))]
    if others:
        log.debug("%s: ignored %d tensors outside image_proj and ip_adapter", path, len(others))
    return sections["image_proj"], sections["ip_adapter"]


def _nested_sections(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The {"image_proj": {...}, "ip_adapter": {...}} of a torch file, flattened to "image_proj.<key>"; read by
    checkpoints.io's safe loader (weights_only, zip checked), as read_checkpoint would."""
    mmap = _check_torch_zip(path) if fmt == "torch-zip" else False
    obj = _safe_torch_load(path, mmap=mmap)
    flat = {}
    for name in _SECTIONS:
        section = obj.get(name) if isinstance(obj, Mapping) else None
        if isinstance(section, Mapping):
            flat.update({f"{name}.{k}": v for k, v in section.items()
                         if isinstance(k, str) and isinstance(v, torch.Tensor)})
    return flat


def config_from_state_dict(image_proj: Mapping[str, torch.Tensor], ip: Mapping[str, torch.Tensor]) -> IPAdapterConfig:
    """The adapter's kind and sizes from its tensors' names and shapes (CheckpointError if it is none we know)."""
    widths, context_dim = _attention_widths(ip)
    kind = _kind(image_proj)
    if kind == "plain":
        weight = _get(image_proj, "proj.weight", "image_embeds.weight")  # (N * D, P)
        return IPAdapterConfig("plain", weight.shape[1], context_dim, weight.shape[0] // context_dim, widths)
    if kind == "full":
        weight = _get(image_proj, "proj.0.weight", "ff.net.0.proj.weight")  # (W, W)
        return IPAdapterConfig("full", weight.shape[1], context_dim, FULL_TOKENS, widths)
    latents = image_proj["latents"]  # (1, N, width)
    resampler = _resampler_config(image_proj, latents.shape[2])
    return IPAdapterConfig("plus", image_proj["proj_in.weight"].shape[1], context_dim, latents.shape[1], widths,
                           resampler)


def _kind(image_proj: Mapping[str, torch.Tensor]) -> str:
    if any(k.startswith("perceiver_resampler.") for k in image_proj) or (
        "norm.weight" in image_proj and "proj.2.weight" in image_proj and "proj.3.weight" not in image_proj
    ):
        raise CheckpointError("an IP-Adapter FaceID file (it projects insightface face embeddings, not CLIP image "
                              "features); sdlab supports plain, plus and full IP-Adapters")
    if "proj.weight" in image_proj or "image_embeds.weight" in image_proj:
        return "plain"
    if "proj.3.weight" in image_proj or "ff.net.0.proj.weight" in image_proj:
        return "full"
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return "plus"
    raise CheckpointError("image_proj is none of the IP-Adapter projections sdlab knows (plain: proj.weight, "
                          "full: proj.0-3, plus: latents and proj_in)")


def _get(tensors: Mapping[str, torch.Tensor], *names: str) -> torch.Tensor:
    return next(tensors[n] for n in names if n in tensors)


def _attention_widths(ip: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """((inner width of each cross-attention in key order), D) from "1.to_k_ip.weight", "3.to_k_ip.weight", ..."""
    ids: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        match = _IP_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"ip_adapter has a tensor {quoted_key(key)} that is not '<n>.to_k_ip.weight' or "
                                  "'<n>.to_v_ip.weight' (IP-Adapter LoRA and FaceID variants are not supported)")
        ids.setdefault(int(match.group(1)), {})[match.group(2)] = value
    expected = list(range(1, 2 * len(ids), 2))
    if sorted(ids) != expected:
        raise CheckpointError(f"ip_adapter's layers are numbered {sorted(ids)[:6]}...; expected the odd numbers "
                              f"1, 3, ..., {expected[-1]} (one per UNet cross-attention)")
    widths, dims = [], set()
    for n in expected:
        pair = ids[n]
        if set(pair) != {"to_k_ip", "to_v_ip"} or pair["to_k_ip"].shape != pair["to_v_ip"].shape:
            raise CheckpointError(f"ip_adapter layer {n} needs to_k_ip and to_v_ip weights of one shape")
        if pair["to_k_ip"].ndim != 2:
            raise CheckpointError(f"ip_adapter layer {n}: to_k_ip.weight is not a matrix")
        widths.append(pair["to_k_ip"].shape[0])
        dims.add(pair["to_k_ip"].shape[1])
    if len(dims) != 1:
        raise CheckpointError(f"ip_adapter's layers read contexts of different widths {sorted(dims)}")
    return tuple(widths), dims.pop()


def _resampler_config(image_proj: Mapping[str, torch.Tensor], width: int) -> ResamplerConfig:
    depth = len({int(m.group(1)) for m in map(_RESAMPLER_LAYER.fullmatch, image_proj) if m})
    q = _get(image_proj, "layers.0.0.to_q.weight", "layers.0.attn.to_q.weight")  # (heads * 64, width)
    ff = _get(image_proj, "layers.0.1.1.weight", "layers.0.ff.1.net.0.proj.weight")  # (ff_width, width)
    if q.shape[0] % RESAMPLER_HEAD_DIM:
        raise CheckpointError(f"the resampler's to_q has {q.shape[0]} rows, not a multiple of the head size 64")
    return ResamplerConfig(width, depth, q.shape[0] // RESAMPLER_HEAD_DIM, RESAMPLER_HEAD_DIM, ff.shape[0])


def convert_image_proj(image_proj: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The original repository's image_proj names -> diffusers' (names already in diffusers' form pass)."""
    if kind == "plus":
        return _convert_resampler(image_proj)
    table = PLAIN_KEYS if kind == "plain" else FULL_KEYS
    return {_rename(k, table): v for k, v in image_proj.items()}


def _rename(key: str, table: Sequence[tuple[str, str]]) -> str:
    return next((ours + key[len(theirs) :] for theirs, ours in table if key.startswith(theirs)), key)


def _convert_resampler(image_proj: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in image_proj.items():
        match = _RESAMPLER_LAYER.fullmatch(key)
        if match is None:
            out[key] = value  # latents, proj_in, proj_out, norm_out: the same names
        elif match.group(2) == "0.to_kv.weight":  # (2 * inner, width): keys then values
            k, v = value.chunk(2, dim=0)
            out[f"layers.{match.group(1)}.attn.to_k.weight"], out[f"layers.{match.group(1)}.attn.to_v.weight"] = k, v
        else:
            out[f"layers.{match.group(1)}.{_rename(match.group(2), RESAMPLER_LAYER_KEYS)}"] = value
    return out


# --- using it ---------------------------------------------------------------------------------------------------


def cross_attentions(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attentions (attn2 of each transformer block), in diffusers' attention-processor order:
    down blocks, up blocks, then the middle block, each in module order; the adapter's layer k (keys "1.",
    "3.", ...) belongs to the k-th of them."""
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet
    blocks = [(name, m.attn2) for name, m in unet.named_modules() if isinstance(m, TransformerBlock)]
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    named = [(f"{name}.attn2", attn) for name, attn in blocks]
    return sorted(named, key=lambda item: group.get(item[0].split(".")[0], 3))  # stable: module order within


@contextmanager
def ip_adapter_attention(unet: nn.Module, adapter: IPAdapter, scale: float = 1.0, *,
                         num_tokens: int | None = None) -> Iterator[None]:
    """Within the block, every cross-attention of `unet` treats the last `num_tokens` context tokens as image
    tokens (default: the adapter's N, one reference image; k images' tokens concatenated: k * N) and adds
    `scale` x their attention. Restores the UNet on exit. The adapter must be on the UNet's device and dtype."""
    targets = cross_attentions(unet)
    _check_fits(targets, adapter, scale)
    tokens = adapter.cfg.num_tokens if num_tokens is None else num_tokens
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ParameterError(f"ip_adapter_attention: num_tokens must be a positive integer, got {tokens!r}")
    layers = list(adapter.ip_adapter.values())
    try:
        for (_, attn), layer in zip(targets, layers):
            attn.ip = IPAttention(layer.to_k_ip, layer.to_v_ip, tokens, float(scale))
        yield
    finally:
        for _, attn in targets:
            attn.ip = None


def _check_fits(targets: list[tuple[str, Attention]], adapter: IPAdapter, scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not -1e3 < scale < 1e3:
        raise ParameterError(f"ip_adapter_attention: scale must be a number (usually 0 to 1), got {scale!r}")
    widths = adapter.cfg.attention_widths
    if len(targets) != len(widths):
        raise ParameterError(f"this IP-Adapter has weights for {len(widths)} cross-attentions; the UNet has "
                             f"{len(targets)} (an adapter for another model family?)")
    for (name, attn), width in zip(targets, widths):
        if attn.ip is not None:
            raise ParameterError(f"an IP-Adapter is already installed on {name}; install one at a time")
        if (attn.to_k.out_features, attn.to_k.in_features) != (width, adapter.cfg.context_dim):
            raise ParameterError(f"this IP-Adapter does not fit {name}: it has width {width} for a context of "
                                 f"{adapter.cfg.context_dim}; the UNet's has {attn.to_k.out_features} for "
                                 f"{attn.to_k.in_features}")


def image_tokens(adapter: IPAdapter, encoder: CLIPVisionEncoder, images: Sequence[Image.Image] | torch.Tensor, *,
                 negative: bool = False) -> torch.Tensor:
    """The image tokens (B, N, D) of B reference images (PIL images or pixels from `clip_image_pixels`), or,
    with `negative`, the unconditional tokens diffusers pairs with them for classifier-free guidance:
    plain projects zeros in place of the image embedding; plus/full encode an all-zero pixel tensor."""
    pixels = images if isinstance(images, torch.Tensor) else clip_image_pixels(images, encoder.cfg.image_size)
    weight = encoder.visual_projection.weight
    pixels = pixels.to(device=weight.device, dtype=weight.dtype)
    if adapter.cfg.uses_hidden_states:
        features = encoder.penultimate(torch.zeros_like(pixels) if negative else pixels)  # (B, T, W)
    elif negative:
        features = pixels.new_zeros(pixels.shape[0], encoder.cfg.projection_dim)  # (B, P)
    else:
        features = encoder(pixels)[0]
    return adapter(features)
