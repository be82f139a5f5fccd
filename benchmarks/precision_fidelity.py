"""How far the lower precisions move an image from fp32's: the same prompt and seeds through sdlab in fp32, bf16
and bf16 with the UNet in int8 (`quantize="int8"`), on the random-weight SD 1.5-config model that
benchmarks/inference.py builds and caches (or `--model`), with the largest and mean pixel difference and the
PSNR of each against fp32. (Prompt adherence on a trained model: benchmarks/quality_speedups.py.)

    python benchmarks/precision_fidelity.py                 # 256x256, 20 DPM++ 2M steps, seeds 0-2
    python benchmarks/precision_fidelity.py --size 512 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import NEGATIVE, PROMPT, ensure_model  # noqa: E402

import sdlab  # noqa: E402

SETTINGS = {  # label -> sdlab.load options
    "fp32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "bf16, UNet in int8": {"dtype": torch.bfloat16, "quantize": "int8"},
    "fp32, UNet in int8": {"dtype": torch.float32, "quantize": "int8"},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def images(folder: str, options: dict, args) -> list[np.ndarray]:
    model = sdlab.load(folder, **options)
    params = sdlab.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                                    steps=args.steps, sampler="DPM++ 2M", cfg_scale=7.5)
    return [np.asarray(sdlab.generate(model, params.replace(seed=seed)).images[0]) for seed in range(args.seeds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers folder (default: the cached random-weight SD 1.5 one)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="images per setting (seeds 0, 1, ...)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = ensure_model(args.model)
    made = {label: images(folder, options, args) for label, options in SETTINGS.items()}
    print(f"{folder}, {args.size}x{args.size}, {args.steps} DPM++ 2M steps, CFG 7.5, seeds 0-{args.seeds - 1}")
    print("| setting | max difference to fp32 | mean difference | PSNR to fp32 |")
    print("|---|---|---|---|")
    for label, pictures in made.items():
        if label == "fp32":
            continue
        pairs = list(zip(pictures, made["fp32"]))
        largest = max(int(np.abs(a.astype(int) - b).max()) for a, b in pairs)
        mean = np.mean([np.abs(a.astype(int) - b).mean() for a, b in pairs])
        print(f"| {label} | {largest} | {mean:.2f} | {np.mean([psnr(a, b) for a, b in pairs]):.1f} dB |")


if __name__ == "__main__":
    main()
