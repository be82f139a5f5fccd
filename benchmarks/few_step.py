"""Seconds per image of the few-step recipes against a standard run, on one model, in one process.

    python benchmarks/few_step.py [--model FOLDER] [--size 256] [--dtype bf16]

Each row is what the recipe's model card recommends. The cost is the UNet's: steps x (2 calls with CFG,
1 without) + the text encoder and the VAE. The weights are random (the cached SD 1.5-config folder of
benchmarks/inference.py by default), so only the times mean anything here. A distilled model or LoRA of
the recipe's kind gives its images at these settings. The model cards:
  LCM / LCM-LoRA     LCM sampler, 4 steps, CFG 1 (diffusers' LCMScheduler; guidance_scale 1-2)
  TCD / Hyper-SD     TCD sampler, 4 steps, CFG 1, gamma (eta) 0.3
  SD-Turbo           Euler with trailing timesteps, 1 step, CFG 1 (diffusers: guidance_scale 0.0)
  Lightning          Euler with trailing timesteps, 4 steps, CFG 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import sdlab

RECIPES = [  # (name, GenerationParams fields)
    ("standard: DPM++ 2M Karras, 20 steps, CFG 7", {"sampler": "DPM++ 2M", "steps": 20, "cfg_scale": 7.0}),
    ("LCM, 4 steps, CFG 1", {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}),
    ("TCD, 4 steps, CFG 1, gamma 0.3", {"sampler": "TCD", "steps": 4, "cfg_scale": 1.0, "eta": 0.3}),
    ("Turbo: Euler trailing, 1 step, CFG 1", {"sampler": "Euler", "steps": 1, "cfg_scale": 1.0, "trailing": True}),
    ("Lightning: Euler trailing, 4 steps, CFG 1", {"sampler": "Euler", "steps": 4, "cfg_scale": 1.0, "trailing": True}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a diffusers folder (default: benchmarks/inference.py's cached SD 1.5 one)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        import inference  # benchmarks/ is the script's folder: sys.path[0]

        args.model = inference.ensure_model(None, "sd15")
    model = sdlab.load(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    plain_schedule = model.config.schedule  # Turbo and Lightning folders say "trailing" in their scheduler config
    trailing = dataclasses.replace(plain_schedule, timestep_spacing="trailing")
    print(f"{args.model}, {args.size}x{args.size}, {args.dtype}, {args.threads} threads\n")
    print("| recipe | UNet calls | s / image | speed vs standard |")
    print("|---|---|---|---|")
    calls = [0]
    model.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    base = None
    for name, fields in RECIPES:
        fields = dict(fields)
        model.config = model.config.replace(schedule=trailing if fields.pop("trailing", False) else plain_schedule)
        params = sdlab.GenerationParams(prompt="a lighthouse at dusk", width=args.size, height=args.size, seed=1,
                                        **fields)
        sdlab.generate(model, params.replace(steps=1))  # warm: packing, first-call kernels
        calls[0] = 0
        start = time.perf_counter()
        sdlab.generate(model, params)
        seconds = time.perf_counter() - start
        base = base or seconds
        print(f"| {name} | {calls[0]} | {seconds:.2f} | {base / seconds:.1f}x |")


if __name__ == "__main__":
    main()
