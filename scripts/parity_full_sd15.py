#!/usr/bin/env python3
"""Compare sdlab's full-size UNet and VAE with diffusers (the reference), in numbers and in time.

    python scripts/parity_full_sd15.py                       # random weights, SD 1.5 shapes
    python scripts/parity_full_sd15.py --preset sd21         # SD 2.1 UNet shapes (VAE is the same)
    python scripts/parity_full_sd15.py --model DIR           # a diffusers folder with unet/ and vae/

Weights are created (or loaded) by diffusers and copied into sdlab's modules with strict=True, so this also
checks that a diffusers folder loads with no key mapping. Prints the max abs difference of each output and
the time of one forward of each implementation (fp32, CPU unless --device says otherwise).
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdlab.config import PRESETS, UNetConfig, VAEConfig
from sdlab.nn.unet import UNet
from sdlab.nn.vae import VAE


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=tuple(cfg.heads_at(i) for i in range(len(cfg.channels))),
        transformer_layers_per_block=cfg.transformer_depth,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_groups,
    )


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKL:
    levels = len(cfg.channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
    )


def timed(fn, repeats: int) -> tuple[torch.Tensor, float]:
    """Output of fn() and its best wall time over `repeats` runs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def report(name: str, ours: torch.Tensor, ref: torch.Tensor, t_ours: float, t_ref: float) -> None:
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name:12s} max|diff| {diff:.3g} (scale {scale:.3g})  sdlab {t_ours:.2f}s  diffusers {t_ref:.2f}s  "
          f"ratio {t_ref / t_ours:.2f}x")


def compare_unet(ref: UNet2DConditionModel, cfg: UNetConfig, args) -> None:
    ours = UNet(cfg).eval().to(args.device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    side = args.size // 8
    x = torch.randn(args.batch, cfg.in_channels, side, side, device=args.device)
    context = torch.randn(args.batch, 77, cfg.context_dim, device=args.device)
    t = torch.linspace(999.0, 1.0, args.batch, device=args.device)
    out, t_ours = timed(lambda: ours(x, t, context), args.repeats)
    expected, t_ref = timed(lambda: ref(x, t, context).sample, args.repeats)
    report("unet", out, expected, t_ours, t_ref)


def compare_vae(ref: AutoencoderKL, cfg: VAEConfig, args) -> None:
    ours = VAE(cfg).eval().to(args.device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    image = torch.rand(1, 3, args.size, args.size, device=args.device) * 2 - 1
    (mean, _), t_ours = timed(lambda: ours.encode(image), args.repeats)
    dist, t_ref = timed(lambda: ref.encode(image).latent_dist, args.repeats)
    report("vae.encode", mean, dist.mean, t_ours, t_ref)
    decoded, t_ours = timed(lambda: ours.decode(mean), args.repeats)
    expected, t_ref = timed(lambda: ref.decode(mean).sample, args.repeats)
    report("vae.decode", decoded, expected, t_ours, t_ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    parser.add_argument("--model", help="diffusers folder with unet/ and vae/ (default: random weights)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    if args.model:
        unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    else:
        unet, vae = diffusers_unet(cfg.unet), diffusers_vae(cfg.vae)
    with torch.inference_mode():
        compare_unet(unet.eval().to(args.device), cfg.unet, args)
        del unet
        compare_vae(vae.eval().to(args.device), cfg.vae, args)


if __name__ == "__main__":
    main()
