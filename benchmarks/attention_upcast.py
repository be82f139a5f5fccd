"""Is attention in fp32 worth it under bf16 weights? Accuracy on the built-in model and speed at SDXL's shapes.

    python benchmarks/attention_upcast.py

Accuracy: the built-in model's images in bf16 (the fast path, `sdlab.perf.optimize`) with and without the
upcast, against the same images in fp32 (max and mean difference in 8-bit levels; 3 prompts, 20 steps).
Speed: one scaled-dot-product attention call at SDXL's shapes (batch 2 for CFG, 64-wide heads; 512x512
images: 256 tokens at the 16x16 level, 1024 at 32x32; 77 text tokens), bf16 against bf16 upcast to fp32
and back, and each one's largest error against fp64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import sdlab
from sdlab import GenerationParams, perf
from timing import seconds  # benchmarks/, the script's folder

PROMPTS = ["a red circle above a blue square", "a green triangle left of a yellow circle", "two blue squares"]
SHAPES = [(2, 20, 256, 256), (2, 20, 256, 77), (2, 10, 1024, 1024), (2, 10, 1024, 77)]  # (B, heads, N, T)


def images(dtype: torch.dtype | None, upcast: bool | None) -> list[np.ndarray]:
    model = sdlab.load(sdlab.model.builtin_model_path())
    if dtype is not None:
        perf.optimize(model, dtype=dtype, attention_upcast=upcast)
    return [np.asarray(sdlab.generate(model, GenerationParams(prompt=p, seed=i, steps=20)).images[0]).astype(int)
            for i, p in enumerate(PROMPTS)]


def main() -> None:
    reference = images(None, None)
    for upcast in (True, False):
        diffs = [np.abs(a - b) for a, b in zip(images(torch.bfloat16, upcast), reference)]
        print(f"bf16, upcast {upcast}: vs fp32 max {max(d.max() for d in diffs)}, "
              f"mean {np.mean([d.mean() for d in diffs]):.3f} levels")
    for b, h, n, t in SHAPES:
        q, k, v = (torch.randn(b, h, m, 64).bfloat16() for m in (n, t, t))
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        plain = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        upcast = lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()  # noqa: E731
        print(f"attention {b}x{h} heads, {n} -> {t} tokens: bf16 {seconds(plain) * 1e3:.1f} ms "
              f"(error {(plain().double() - exact).abs().max():.4f}), upcast {seconds(upcast) * 1e3:.1f} ms "
              f"(error {(upcast().double() - exact).abs().max():.4f})")


if __name__ == "__main__":
    main()
