"""A tiny VAE decoder (TAESD, Bohan 2023, the architecture of diffusers' `AutoencoderTiny` decoder): an opt-in
speedup that decodes latents with plain 3x3 convs and ReLUs instead of the full VAE decoder, at some cost in
quality.

    latents (B, 4, h, w), as the UNet sees them (already scaled) --tanh clamp to +-3-->
    conv 4->C, ReLU, [blocks, 2x nearest upsample, conv] per level ... --> (B, 3, h*f, w*f) in [-1, 1]

Each block is conv-ReLU-conv-ReLU-conv plus a skip, then ReLU. The `state_dict()` keys equal diffusers'
`AutoencoderTiny` decoder (`layers.N.conv.M.weight`, under `decoder.` in a diffusers folder), so its
folders and the original `taesd_decoder.safetensors` files load with `load_tiny_decoder`;
`save_tiny_decoder` writes such a folder (decoder weights only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdlab.checkpoints.atomic import atomic_folder
from sdlab.checkpoints.io import read_state_dict, write_safetensors
from sdlab.errors import CheckpointError

# Weights: a diffusers AutoencoderTiny folder, or one file of decoder weights.
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 64, 64, 64)  # per level; the number of levels - 1 is the number of 2x ups
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per level
    out_channels: int = 3

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.channels) - 1)


class TinyBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity()  # TAESD's blocks keep their width, so the skip needs no 1x1 conv
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Module):
    """forward(latents (B, latent_channels, h, w), UNet-scaled) -> images (B, 3, h * upscale, w * upscale)."""

    def __init__(self, cfg: TinyDecoderConfig = TinyDecoderConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.channels[0], 3, padding=1), nn.ReLU()]
        for level, (width, blocks) in enumerate(zip(cfg.channels, cfg.blocks)):
            last = level == len(cfg.channels) - 1
            layers += [TinyBlock(width) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            out = cfg.out_channels if last else cfg.channels[level + 1]
            layers.append(nn.Conv2d(width, out, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # soft clamp to +-3: TAESD was trained on latents in that range
        return self.layers(x) * 2 - 1  # its output is in [0, 1]; sdlab's images are in [-1, 1]


def load_tiny_decoder(path: str | Path, *, dtype: torch.dtype = torch.float32) -> TinyDecoder:
    """A TinyDecoder from a diffusers AutoencoderTiny folder (config.json + weights) or a decoder weights file
    (diffusers keys with or without `decoder.`, or the original TAESD file, whose keys count the clamp as 0)."""
    path = Path(path)
    cfg = TinyDecoderConfig()
    if path.is_dir():
        cfg = _folder_config(path)
        files = [path / name for name in FOLDER_WEIGHTS if (path / name).is_file()]
        if not files:
            raise CheckpointError(f"{path}: no AutoencoderTiny weights ({' or '.join(FOLDER_WEIGHTS)})")
        path = files[0]
    state = _decoder_keys(read_state_dict(path), path)
    decoder = TinyDecoder(cfg)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise CheckpointError(
            f"{path}: not a tiny VAE decoder for {cfg}: missing {sorted(expected.keys() - found.keys())[:4]}, "
            f"unexpected {sorted(found.keys() - expected.keys())[:4]}, other shapes {wrong[:4]}")
    decoder.load_state_dict(state)
    return decoder.to(dtype).eval()


def save_tiny_decoder(decoder: TinyDecoder, folder: str | Path, *, dtype: torch.dtype = torch.float16,
                      overwrite: bool = False) -> Path:
    """Write `decoder` as an AutoencoderTiny-style folder that `load_tiny_decoder` reads back: config.json with
    the decoder fields, and the weights under `decoder.` (no encoder, so diffusers itself cannot load it)."""
    cfg = decoder.cfg
    config = {"_class_name": "AutoencoderTiny", "latent_channels": cfg.latent_channels,
              "out_channels": cfg.out_channels, "decoder_block_out_channels": list(cfg.channels),
              "num_decoder_blocks": list(cfg.blocks), "scaling_factor": 1.0}
    with atomic_folder(folder, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {f"decoder.{k}": v.detach().to(dtype) for k, v in decoder.state_dict().items()}
        write_safetensors(staging / FOLDER_WEIGHTS[0], state)
    return Path(folder)


def _folder_config(folder: Path) -> TinyDecoderConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read an AutoencoderTiny config ({e})") from None
    if raw.get("scaling_factor", 1.0) != 1.0 or raw.get("shift_factor", 0.0) not in (0.0, None):
        raise CheckpointError(f"{folder}: AutoencoderTiny with scaling_factor/shift_factor is not supported "
                              "(TAESD for SD 1.x/2.x decodes the UNet's latents as they are)")
    return TinyDecoderConfig(
        latent_channels=raw.get("latent_channels", 4),
        channels=tuple(raw.get("decoder_block_out_channels", (64, 64, 64, 64))),
        blocks=tuple(raw.get("num_decoder_blocks", (3, 3, 3, 1))),
        out_channels=raw.get("out_channels", 3),
    )


def _decoder_keys(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keys as `TinyDecoder` names them: strip `decoder.`, drop the encoder, renumber the original TAESD file."""
    if any(k.startswith("decoder.") for k in state):
        return {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if any(k.startswith("layers.") for k in state):
        return state
    if "1.weight" in state:  # madebyollin/taesd: nn.Sequential(Clamp(), conv, ReLU, ...): one index further
        return {f"layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    raise CheckpointError(f"{path}: no tiny VAE decoder weights (expected keys like 'decoder.layers.0.weight')")
