"""Distil a tiny VAE decoder (TAESD architecture, `sdlab.nn.tiny_vae`) from a model's full VAE decoder, on
shapes-world images: the student learns to turn the UNet's latents into what the full decoder makes of them.

    python scripts/train_tiny_decoder.py                      # for the built-in model -> runs/tiny-decoder
    sdlab generate "a red circle" --tiny-vae runs/tiny-decoder
    python benchmarks/quality_speedups.py --tiny-vae runs/tiny-decoder

Writes an AutoencoderTiny-style folder (config.json + diffusion_pytorch_model.safetensors, decoder weights
only) that `load_tiny_decoder` reads. For SD 1.x/2.x use the published TAESD weights instead.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlab.families import latent_format
from sdlab.model import Model
from sdlab.nn.tiny_vae import TinyDecoder, TinyDecoderConfig, save_tiny_decoder
from sdlab.shapes import ShapesDataset

log = logging.getLogger("train_tiny_decoder")


def batches(model: Model, batch_size: int, seed: int):
    """Endless (UNet-space latents (B, 4, h, w), full decoder's images (B, 3, H, W)) from shapes scenes."""
    data = ShapesDataset(seed=seed, size=model.config.default_size)
    latents = latent_format(model.config)
    index = 0
    while True:
        images = np.stack([data[i][0] for i in range(index, index + batch_size)])  # (B, H, W, 3) uint8
        index += batch_size
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():  # (yield outside the block: a suspended no_grad would leak into the caller)
            mean, _ = model.vae.encode(pixels)
            target = model.vae.decode(mean).clamp(-1, 1)
        yield latents.to_diffusion(mean), target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-decoder"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32, help="channels of every level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:  # say so before training, not after
        parser.error(f"{args.out} already exists; pass --overwrite to replace it, or another --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Model.from_name(args.model)
    levels = int(np.log2(model.config.vae.downscale)) + 1
    decoder = TinyDecoder(TinyDecoderConfig(channels=(args.width,) * levels, blocks=(2,) * (levels - 1) + (1,)))
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr)
    started = time.perf_counter()
    for step, (latents, target) in zip(range(1, args.steps + 1), batches(model, args.batch, args.seed)):
        loss = F.l1_loss(decoder(latents), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            log.info("step %d: L1 %.4f (%.0f s)", step, loss.item(), time.perf_counter() - started)
    log.info("saved %s", save_tiny_decoder(decoder, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
