#!/usr/bin/env python3
"""sdlab's networks against diffusers / transformers on the full-size SDXL base and refiner configs, fp32.

    python scripts/parity_full_sdxl.py                        # base and refiner, 512x512 latents' worth
    python scripts/parity_full_sdxl.py --preset sdxl-refiner --size 1024

Each network is built by the reference library from sdlab's own config translation (sdlab.checkpoints.configs,
so this also checks that Stability's diffusers folders load with no key mapping), given random weights, and
sdlab's network takes the *same* tensors (load_state_dict(assign=True): no second copy, so the 2.6 B-parameter
UNet fits in 24 GB); one component at a time, freed before the next. Prints the max abs difference of each
output relative to its scale (target: <= 1e-4) and the time of one forward of each.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlab import families
from sdlab.checkpoints import configs
from sdlab.config import PRESETS
from sdlab.diffusion.conditioning import Conditioning, run_network


def _kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def report(name: str, ours: torch.Tensor, ref: torch.Tensor, t_ours: float, t_ref: float) -> float:
    diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    relative = diff / max(scale, 1e-12)
    verdict = "ok" if relative <= 1e-4 else "OVER 1e-4"
    print(f"{name:28s} max|diff| {diff:.3g} (scale {scale:.3g}, relative {relative:.2g}, {verdict})  "
          f"sdlab {t_ours:.2f}s  reference {t_ref:.2f}s", flush=True)
    return relative


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Distinctive weights everywhere (diffusers zero-initialises some layers), at a scale that keeps
    activations finite through 70 transformer blocks."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if p.ndim > 1 else 0.1))
    return module


def ours_sharing(reference: torch.nn.Module, component, config) -> torch.nn.Module:
    """sdlab's network for `component`, holding the reference's own tensors."""
    with torch.device("meta"):
        ours = component.build(config)
    state = reference.state_dict()
    if component.library == "transformers":
        state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                 for k, v in state.items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def compare_text_encoder(name, component, config, args) -> float:
    cfg = config.network(name)
    reference_class = CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel
    ref = randomize_(reference_class(CLIPTextConfig(**configs.text_encoder_to_transformers(cfg)))).eval()
    ours = ours_sharing(ref, component, config)
    ids = torch.randint(0, cfg.vocab_size - 2, (2, cfg.max_length))
    ids[:, 0], ids[0, 20], ids[1, -1] = 49406, 49407, 49407  # start, an end-of-text token in each prompt
    ids[0, 21:] = cfg.pad_token_id
    (hidden, pooled), t_ours = timed(lambda: ours.encode(ids, clip_skip=2))
    out, t_ref = timed(lambda: ref(ids, output_hidden_states=True))
    worst = report(f"{name} penultimate layer", hidden, out.hidden_states[-2], t_ours, t_ref)
    if cfg.projection_dim:
        worst = max(worst, report(f"{name} pooled + projection", pooled, out.text_embeds, 0.0, 0.0))
    return worst


def compare_unet(component, config, args) -> float:
    cfg = config.unet
    sample = config.default_size // config.vae.downscale
    ref = randomize_(UNet2DConditionModel(**_kwargs(configs.unet_to_diffusers(cfg, sample)))).eval()
    ours = ours_sharing(ref, component, config)
    side = args.size // config.vae.downscale
    x = torch.randn(2, cfg.in_channels, side, side)
    context = torch.randn(2, 77, cfg.context_dim)
    t = torch.tensor([999.0, 250.0])
    pooled = torch.randn(2, cfg.added_pooled_dim)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 32.0, 0.0, 1024.0, 1024.0]])
    time_ids = time_ids[:, : cfg.added_time_ids].clone()
    if cfg.added_time_ids == 5:  # the refiner: original size, crop, aesthetic score
        time_ids[:, 4] = torch.tensor([6.0, 2.5])
    cond = Conditioning(context=context, added=torch.cat([pooled, time_ids], dim=1))
    out, t_ours = timed(lambda: run_network(ours, x, t, cond))
    expected, t_ref = timed(lambda: ref(x, t, context, added_cond_kwargs={"text_embeds": pooled,
                                                                         "time_ids": time_ids}).sample)
    return report("unet", out, expected, t_ours, t_ref)


def compare_vae(component, config, args) -> float:
    ref = AutoencoderKL(**_kwargs(configs.vae_to_diffusers(config.vae, config.default_size))).eval()
    ours = ours_sharing(ref, component, config)
    image = torch.rand(1, 3, args.size, args.size) * 2 - 1
    (mean, _), t_ours = timed(lambda: ours.encode(image))
    dist, t_ref = timed(lambda: ref.encode(image).latent_dist)
    worst = report("vae.encode", mean, dist.mean, t_ours, t_ref)
    decoded, t_ours = timed(lambda: ours.decode(mean))
    expected, t_ref = timed(lambda: ref.decode(mean).sample)
    return max(worst, report("vae.decode", decoded, expected, t_ours, t_ref))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=["sdxl-base", "sdxl-refiner", "sdxl-inpaint"],
                        help="repeatable (default: sdxl-base and sdxl-refiner)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are size/8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    worst = 0.0
    for preset in args.preset or ["sdxl-base", "sdxl-refiner"]:
        config = PRESETS[preset]
        print(f"--- {preset}, fp32, {args.size}x{args.size} ---", flush=True)
        for name, component in families.family_of(config).components.items():
            torch.manual_seed(0)
            with torch.inference_mode():
                if component.tokenizer:
                    worst = max(worst, compare_text_encoder(name, component, config, args))
                elif name == "unet":
                    worst = max(worst, compare_unet(component, config, args))
                else:
                    worst = max(worst, compare_vae(component, config, args))
            gc.collect()
    print(f"largest relative difference: {worst:.2g} ({'within' if worst <= 1e-4 else 'OVER'} 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
