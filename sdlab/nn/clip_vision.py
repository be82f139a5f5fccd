"""The CLIP image tower that IP-Adapter reads images with, and CLIP's image preprocessing.

A ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") as CLIP trains it (Radford et al. 2021):
14x14 patches plus a class token, learned position embeddings, a LayerNorm before the layers ("pre_layrnorm",
transformers' spelling), pre-LN residual layers without a causal mask, a LayerNorm of the class token and a
projection into the joint image-text space. IP-Adapter (Ye et al. 2023) uses OpenCLIP ViT-H/14 for SD 1.5
("models/image_encoder") and ViT-bigG/14 for SDXL ("sdxl_models/image_encoder"); plain IP-Adapter reads the
projected class token (`image_embeds`), "plus" and "full" read the penultimate layer's 257 tokens.

Module names mirror transformers' `CLIPVisionModelWithProjection` (vision_model.embeddings...,
vision_model.encoder.layers.N..., visual_projection), so its files load with no key mapping. The attention
and MLP are those of the text tower (`sdlab.nn.clip`) without its causal mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdlab.checkpoints.io import quoted_key, read_small_file, read_state_dict
from sdlab.errors import CheckpointError, ParameterError
from sdlab.nn.clip import ACTIVATIONS, MLP, CausalSelfAttention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP vision tower. Field names are shared with `TextEncoderConfig` where they mean the same
    thing (width, num_heads, mlp_width, activation, layer_norm_eps), so the text tower's MLP builds from it."""

    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_width: int = 5120
    projection_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 257 for 224x224 images in 14x14 patches."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config_json: Mapping) -> CLIPVisionConfig:
        """From a transformers `config.json` (a CLIPVisionConfig, or a CLIPConfig with a `vision_config`).
        Missing fields take transformers' defaults, as transformers itself does."""
        if not isinstance(config_json, Mapping):
            raise CheckpointError(f"image encoder config: expected a JSON object, got a {type(config_json).__name__}")
        vision = config_json.get("vision_config", config_json)
        if not isinstance(vision, Mapping):
            raise CheckpointError("image encoder config: 'vision_config' is not a JSON object")
        values = {ours: vision.get(theirs, default) for ours, (theirs, default) in _TRANSFORMERS_NAMES.items()}
        cfg = cls(**values)
        _check_config(cfg)
        return cfg


# Our field -> (transformers' config key, transformers' default).
_TRANSFORMERS_NAMES = {
    "width": ("hidden_size", 768), "num_layers": ("num_hidden_layers", 12), "num_heads": ("num_attention_heads", 12),
    "mlp_width": ("intermediate_size", 3072), "projection_dim": ("projection_dim", 512),
    "image_size": ("image_size", 224), "patch_size": ("patch_size", 32), "activation": ("hidden_act", "quick_gelu"),
    "layer_norm_eps": ("layer_norm_eps", 1e-5), "num_channels": ("num_channels", 3),
}  # fmt: skip

VIT_H_14 = CLIPVisionConfig()  # h94/IP-Adapter models/image_encoder (OpenCLIP ViT-H/14, laion2B)
VIT_BIGG_14 = CLIPVisionConfig(width=1664, num_layers=48, mlp_width=8192, projection_dim=1280)  # sdxl_models/


def _check_config(cfg: CLIPVisionConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "activation":
            if value not in ACTIVATIONS:
                raise CheckpointError(f"image encoder config: hidden_act={value!r} is unknown; "
                                      f"valid: {sorted(ACTIVATIONS)}")
        elif f.name == "layer_norm_eps":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise CheckpointError(f"image encoder config: layer_norm_eps={value!r} is not a number in (0, 1)")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"image encoder config: {_TRANSFORMERS_NAMES[f.name][0]}={value!r} is not a "
                                  "positive integer")
    if cfg.width % cfg.num_heads or cfg.image_size % cfg.patch_size:
        raise CheckpointError(f"image encoder config: hidden_size {cfg.width} must divide by num_attention_heads "
                              f"{cfg.num_heads}, and image_size {cfg.image_size} by patch_size {cfg.patch_size}")


class SelfAttention(CausalSelfAttention):
    """The text tower's multi-head self-attention (same projections and names) with every token seeing all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, T, width)


class VisionEncoderLayer(nn.Module):
    """A pre-LN transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg.width, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    """Patch embedding (a strided conv), a learned class token in front, plus learned position embeddings."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, S, S) -> tokens (B, 1 + (S / patch)^2, width)."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)  # (B, 1, width)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files written by transformers < 4.31 store a persistent `position_ids` buffer (always 0..256 here).
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class VisionEncoderStack(nn.Module):
    """The layers; a module only so that parameter names match transformers' (`encoder.layers.N`)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))


class VisionTransformer(nn.Module):
    """Embeddings, pre-LayerNorm, layers and the final LayerNorm (`vision_model` in transformers' layout)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoderStack(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPVisionEncoder(nn.Module):
    """CLIP image tower with projection: pixels (B, 3, S, S) -> (image_embeds (B, P), penultimate (B, T, W)).

    `state_dict()` has the keys and shapes of transformers' `CLIPVisionModelWithProjection` (IP-Adapter's
    `image_encoder/model.safetensors` loads strictly). `image_embeds` is transformers' `image_embeds`;
    `penultimate` is its `hidden_states[-2]` (the output of the next-to-last layer, not LayerNormed), which
    is what diffusers gives IP-Adapter plus/full.
    """

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._layers(pixels, self.cfg.num_layers - 1)  # (B, T, W)
        penultimate = hidden
        last = self.vision_model.encoder.layers[-1](hidden)
        pooled = self.vision_model.post_layernorm(last[:, 0])  # the class token, (B, W)
        return self.visual_projection(pooled), penultimate

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        """Only the next-to-last layer's tokens (B, T, W): what plus/full adapters read; skips the last layer."""
        return self._layers(pixels, self.cfg.num_layers - 1)

    def _layers(self, pixels: torch.Tensor, depth: int) -> torch.Tensor:
        self._check_pixels(pixels)
        x = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixels))  # (B, T, W)
        for layer in self.vision_model.encoder.layers[:depth]:
            x = layer(x)
        return x

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        size, channels = self.cfg.image_size, self.cfg.num_channels
        expected = (channels, size, size)
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ParameterError(f"image encoder: pixels must be a tensor of shape (batch, {channels}, {size}, "
                                 f"{size}) (see clip_image_pixels); got {shape}")


def load_image_encoder(folder: str | os.PathLike) -> CLIPVisionEncoder:
    """An `image_encoder/` folder (transformers' config.json + model.safetensors or pytorch_model.bin), strict."""
    folder = Path(folder)
    raw = read_small_file(folder / "config.json", 1 << 20, "image encoder config")
    try:
        config_json = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON") from None
    try:
        cfg = CLIPVisionConfig.from_transformers(config_json)
    except CheckpointError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()),
                   folder / "model.safetensors")
    encoder = CLIPVisionEncoder(cfg)
    load_strict(encoder, read_state_dict(weights), weights)
    return encoder.eval()


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming the file and the first missing, unexpected
    or misshapen tensor (names quoted only when they look like parameter names)."""
    expected = module.state_dict()
    state_dict = dict(state_dict)
    state_dict.pop("vision_model.embeddings.position_ids", None)  # legacy buffer (see VisionEmbeddings)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    for problem, keys in (("is missing", missing), ("is not expected", unexpected), ("has the wrong shape", wrong)):
        if keys:
            raise CheckpointError(f"{path}: does not fit {type(module).__name__}: {quoted_key(keys[0])} {problem} "
                                  f"({len(keys)} such tensors)")
    module.load_state_dict(state_dict, strict=True)


def clip_image_pixels(images: Image.Image | Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 pixels, as transformers' CLIPImageProcessor makes them.

    Transparency is composited onto white, then RGB; the shortest side is resized to `size` (bicubic, the
    long side floored), the centre `size` x `size` cropped, values scaled to [0, 1] and normalized with
    CLIP's mean and std.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, Sequence) or not images:
        raise ParameterError("clip_image_pixels: give a PIL image or a non-empty list of PIL images")
    arrays = [_clip_crop(image, size, index) for index, image in enumerate(images)]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, size, size) uint8
    scaled = (pixels.double() * (1 / 255)).float()  # as transformers rescales: in float64, then float32
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((scaled - mean) / std).contiguous()


def _clip_crop(image: Image.Image, size: int, index: int) -> np.ndarray:
    """One image -> (size, size, 3) uint8: RGB, shortest side resized to `size`, centre-cropped."""
    if not isinstance(image, Image.Image):
        raise ParameterError(f"clip_image_pixels: item {index} is a {type(image).__name__}, not a PIL image")
    image = _to_rgb(image)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new = (size, new_long) if width <= height else (new_long, size)  # (width, height)
    resized = np.asarray(image.resize(new, resample=Image.BICUBIC))  # (h, w, 3)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers' convert_to_rgb does)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
