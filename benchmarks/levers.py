"""What each inference lever of `sdlab.perf` is worth: one UNet call (batch 2, as under CFG) and one VAE
decode, diffusers' networks against sdlab's with the levers switched on one at a time, in one process.

    python benchmarks/levers.py                          # fp32 and bf16, 256x256 (32x32 latents), 3 rounds
    python benchmarks/levers.py --dtypes bf16 --size 512 --rounds 5 --profile
    python benchmarks/levers.py --dtypes bf16 --compile       # adds torch.compile: its compile time and speed

Variants are timed round-robin (each round times every variant `--calls` times after one warm-up call), so
that load from other processes on a shared machine spreads over all of them; the table gives medians.
`--profile` adds where the time of one call goes (convolution, matmul/linear, attention, norms, the rest)
for diffusers and for sdlab with every lever.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inference import ensure_model, unet_flop

import sdlab
from sdlab import perf
from sdlab.nn.layers import Attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAKS = {"fp32": 0.42, "bf16": 0.9}  # TFLOP/s of this 2-core machine (MEASUREMENTS.md)
CATEGORIES = {  # profiler op name fragment -> category
    "convolution": "conv", "addmm": "matmul", "aten::mm": "matmul", "bmm": "matmul", "linear_pointwise": "matmul",
    "scaled_dot_product": "attention", "softmax": "attention", "group_norm": "norm", "layer_norm": "norm",
}  # fmt: skip


class Levers:
    """Switches the levers of `sdlab.perf` on and off on one network in place (no second copy of weights)."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.attentions = [m for m in net.modules() if isinstance(m, Attention)]

    def set(self, channels_last=False, prepack=False, attention_upcast=False):
        perf.unpack(self.net)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for conv in self.net.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
        if prepack:
            perf.prepack(self.net)
        for attention in self.attentions:
            attention.upcast = attention_upcast


VARIANTS = {
    "sdlab (no levers)": {},
    "+ channels_last": {"channels_last": True},
    "+ prepacked oneDNN weights": {"prepack": True},
    "+ attention in fp32": {"attention_upcast": True},
    "channels_last + prepacked": {"channels_last": True, "prepack": True},
    "sdlab, all levers": {"channels_last": True, "prepack": True, "attention_upcast": True},
}


def load_networks(folder: str, dtype: torch.dtype):
    import diffusers

    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
    model = sdlab.load(folder)
    perf.convert_dtype(model.unet, dtype)
    perf.convert_dtype(model.vae, dtype)
    return ref_unet, ref_vae, model


def unet_inputs(size: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=gen).to(dtype)
    context = torch.randn(2, 77, 768, generator=gen).to(dtype)
    return x, torch.tensor([500.0, 500.0]), context


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(fn, calls: int, clock) -> list[float]:
    fn()  # warm-up: oneDNN builds its kernels for a new layout on the first call
    times = []
    for _ in range(calls):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def round_robin(variants: dict, rounds: int, calls: int, clock) -> dict[str, float]:
    """{name: median seconds}; `variants` maps a name to (setup, call)."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (setup, call) in variants.items():
            setup()
            times[name] += time_calls(call, calls, clock)
    return {name: statistics.median(t) for name, t in times.items()}


def profile_categories(fn) -> dict[str, float]:
    """Self CPU seconds of one call, by category of op."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        category = next((c for frag, c in CATEGORIES.items() if frag in event.key), "other")
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e6
    return totals


def compile_row(model, x, t, context, flop: float, reference: float, clock) -> str:
    """torch.compile (inductor, frozen weights) of the plain UNet: compile time and the compiled call."""
    perf.unpack(model.unet)
    compiled = perf.compile_unet(model.unet)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(x, t, context)
        compile_s = time.perf_counter() - start
        step = statistics.median(time_calls(lambda: compiled(x, t, context), 3, clock))
    return (f"| torch.compile, no other lever (first call {compile_s:.0f} s wall) | {step:.3f} | {flop / step / 1e12:.3f} | - "
            f"| {step / reference:.2f} | - | - |")


def bench_dtype(args, folder: str, name: str) -> list[str]:
    dtype = DTYPES[name]
    ref_unet, ref_vae, model = load_networks(folder, dtype)
    x, t, context = unet_inputs(args.size, dtype)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8).to(dtype)
    unet_levers, vae_levers = Levers(model.unet), Levers(model.vae)

    def setup(**levers):
        return lambda: (unet_levers.set(**levers), vae_levers.set(**levers))

    def sd_unet():
        return model.unet(x, t, context)

    def sd_vae():
        return model.vae.decode(latents)

    unet_variants = {"diffusers": (lambda: None, lambda: ref_unet(x, t, context).sample)}
    vae_variants = {"diffusers": (lambda: None, lambda: ref_vae.decode(latents).sample)}
    for label, levers in VARIANTS.items():
        unet_variants[label] = (setup(**levers), sd_unet)
        vae_variants[label] = (setup(**levers), sd_vae)
    with torch.inference_mode():
        clock = CLOCKS[args.clock]
        unet_times = round_robin(unet_variants, args.rounds, args.calls, clock)
        vae_times = round_robin(vae_variants, args.rounds, max(1, args.calls // 2), clock)
        profiles = {}
        if args.profile:
            profiles["diffusers"] = profile_categories(unet_variants["diffusers"][1])
            setup(**VARIANTS["sdlab, all levers"])()
            profiles["sdlab, all levers"] = profile_categories(sd_unet)
    flop = unet_flop(folder, args.size)
    title = (f"\n### {name}, {args.size}x{args.size}: one UNet call (batch 2, {flop / 1e12:.3f} TFLOP) and one VAE "
             f"decode (batch 1); {args.clock} seconds, {args.threads} thread(s)\n")
    rows = [title,
            "| variant | UNet call (s) | TFLOP/s | % of peak | vs diffusers | VAE decode (s) | vs diffusers |",
            "|---|---|---|---|---|---|---|"]
    peak = PEAKS[name] * min(args.threads or 2, 2) / 2  # PEAKS are for both cores
    for label in unet_times:
        step = unet_times[label]
        tflops = flop / step / 1e12
        rows.append(f"| {label} | {step:.3f} | {tflops:.3f} | {100 * tflops / peak:.0f}% "
                    f"| {step / unet_times['diffusers']:.2f} | {vae_times[label]:.3f} "
                    f"| {vae_times[label] / vae_times['diffusers']:.2f} |")
    if args.compile:
        rows.append(compile_row(model, x, t, context, flop, unet_times["diffusers"], CLOCKS[args.clock]))
    for label, totals in profiles.items():
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
        rows.append(f"\nprofile of one UNet call, {label} (self CPU s): {parts}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers SD 1.5-layout folder (default: a cached random-weight one)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="cpu = process CPU time: with --threads 1, robust to other processes sharing the cores")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet (minutes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = ensure_model(args.model)
    rows = [f"python benchmarks/levers.py {' '.join(sys.argv[1:] if argv is None else argv)}"]
    for name in args.dtypes.split(","):
        rows += bench_dtype(args, folder, name)
        print("\n".join(rows), flush=True)
        rows = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
