"""The bf16 and fp32 matrix-multiply throughput of this machine at the shapes of SDXL's transformer layers, for
oneDNN on prepacked weights (sdlab's fast path) and torch's plain F.linear (diffusers' path).

    python benchmarks/matmul_ceiling.py [--threads 2]

Why it matters: SDXL's UNet is 3.18 TFLOP per batch-2 call at 512x512, 55% of it in these linear layers.
The best of these rates bounds how fast any implementation's UNet step can be on this machine
(docs/performance.md, "SDXL base").
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import seconds  # benchmarks/, the script's folder

# (rows, in, out): batch-2 tokens at the 16x16 (512 rows, 1280 wide) and 32x32 (2048 rows, 640 wide) levels of
# a 512x512 SDXL image: attention projections, the GEGLU feed-forward in and out, the text K/V projections.
SHAPES = [(512, 1280, 1280), (512, 1280, 10240), (512, 5120, 1280), (2048, 640, 640), (2048, 640, 5120),
          (2048, 2560, 640), (154, 2048, 1280)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| rows x in x out | bf16 packed (TFLOP/s) | bf16 F.linear | fp32 packed | fp32 F.linear |")
    print("|---|---|---|---|---|")
    best = {}
    for rows, inner, out in SHAPES:
        flop = 2 * rows * inner * out
        cells = []
        for dtype in (torch.bfloat16, torch.float32):
            x, w, b = torch.randn(rows, inner, dtype=dtype), torch.randn(out, inner, dtype=dtype), torch.randn(out, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            for name, f in (("packed", lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")),
                            ("plain", lambda: F.linear(x, w, b))):
                rate = flop / seconds(f, args.repeats) / 1e12
                best[dtype] = max(best.get(dtype, 0.0), rate)
                cells.append(f"{rate:.3f}")
        print(f"| {rows} x {inner} x {out} | " + " | ".join(cells) + " |")
    print(f"\nbest: bf16 {best[torch.bfloat16]:.3f} TFLOP/s, fp32 {best[torch.float32]:.3f} TFLOP/s "
          f"({args.threads} threads)")


if __name__ == "__main__":
    main()
