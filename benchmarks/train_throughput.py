"""Training throughput (samples/s) and peak memory of a small text-to-image model on this machine, fp32 against
bf16 autocast, through the real `sdlab.train.Trainer` (data, text encoder, UNet, AdamW, EMA).

    python benchmarks/train_throughput.py                    # the default small model, batch 16
    python benchmarks/train_throughput.py --batch-size 32 --steps 20 --threads 2   # on a quiet machine

Each precision runs in its own process, so the peak resident memory (ru_maxrss) of one does not hide the
other's. The model is the size the built-in shapes model is meant to have: 64x64 images, a 4x VAE
(16x16 latents), UNet channels (64, 128, 256) with attention only at the two lower-resolution levels,
a 2-layer text encoder of width 128 over 16 tokens. Latents are cached, so the VAE encoder is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

from sdlab.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

SMALL = ModelConfig(
    name="shapes-small",
    text_encoder=TextEncoderConfig(width=128, num_layers=2, num_heads=4, mlp_width=256, max_length=16),
    unet=UNetConfig(channels=(64, 128, 256), attention_levels=(False, True, True), context_dim=128,
                    num_heads=None, head_dim=32),
    vae=VAEConfig(channels=(32, 64, 64), layers_per_block=1),
    default_size=64,
)


def child(precision: str, args) -> dict:
    import torch

    from sdlab.model import Model
    from sdlab.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    times = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(data="shapes", shapes_length=4 * args.batch_size, resolution=64, cache_latents=True,
                             batch_size=args.batch_size, steps=args.warmup + args.steps, precision=precision,
                             ema_decay=0.999, save_every=0, log_every=1000, export_layouts=(), progress_bar=False,
                             output_dir=out)
        torch.manual_seed(0)
        trainer = Trainer(config, model=Model.build(SMALL), callbacks=[lambda t: times.append(time.perf_counter())])
        trainer.run()
    timed = times[args.warmup - 1 :]  # from the end of the last warm-up step
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    params = sum(p.numel() for p in trainer.model.unet.parameters())
    return {"precision": precision, "s_per_step": seconds, "samples_per_s": args.batch_size / seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "unet_params_m": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    # One thread by default: on a shared 2-core machine two OpenMP threads that wait on each other can run
    # 5-10x slower than one; pass --threads 2 on a quiet machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("no", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for precision in ("no", "bf16"):
        command = [sys.executable, __file__, "--child", precision, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"small text-to-image model ({rows[0]['unet_params_m']:.1f} M UNet parameters), 64x64 images, "
          f"16x16 latents, batch {args.batch_size}, {args.threads} threads")
    print("| precision | s/step | samples/s | peak RSS | speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = "fp32" if row["precision"] == "no" else "bf16 autocast"
        speedup = row["samples_per_s"] / rows[0]["samples_per_s"]
        print(f"| {name} | {row['s_per_step']:.3f} | {row['samples_per_s']:.1f} | {row['peak_rss_gb']:.2f} GB | "
              f"{speedup:.2f}x |")


if __name__ == "__main__":
    main()
