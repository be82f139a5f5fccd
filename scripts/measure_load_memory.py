#!/usr/bin/env python
"""Peak memory of `sdlab.checkpoints.load_checkpoint` on an SD 1.5-sized (or SDXL-sized) checkpoint, vs the
weight size.

Writes random weights of SD 1.5's shapes (about 4.3 GB in fp32; `--preset sdxl-base --dtype fp16`: SDXL's,
6.9 GB) as a diffusers folder and/or a single
`.safetensors` file in a temporary directory, then, for each, loads it in a fresh Python process and reports

    peak RSS (ru_maxrss) after loading and touching every weight  -  RSS after `import torch, sdlab`
    -------------------------------------------------------------------------------------------------
                                  bytes of the weights

The target is < 1.3: the loader must not hold the weights twice (safetensors is memory-mapped; renaming
keys and reshaping the VAE's 1x1 convolutions are views). Every tensor is summed so that all pages are read,
as building the model and running it would.

    python scripts/measure_load_memory.py [--layout diffusers|single-file|both] [--dir DIR]
    python scripts/measure_load_memory.py --preset sdxl-base --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys
import torch
import sdlab.checkpoints as ck
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ckpt = ck.load_checkpoint(sys.argv[1])
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nbytes = 0
for sd in ckpt.weights.values():
    for t in sd.values():
        t.sum()  # read every page
        nbytes += t.numel() * t.element_size()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(json.dumps({"base_kib": base, "after_load_kib": after_load, "peak_kib": peak, "weight_bytes": nbytes,
                  "family": ckpt.config.name, "vmhwm_kib": hwm[0] if hwm else None}))
"""


def random_weights(preset: str, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The preset's networks with random weights (shapes from sdlab's own networks, built on meta)."""
    from sdlab import families
    from sdlab.config import PRESETS

    config = PRESETS[preset]
    with torch.device("meta"):
        nets = {name: c.build(config) for name, c in families.family_of(config).components.items()}
    generator = torch.Generator().manual_seed(0)
    return {
        name: {k: (torch.randn(v.shape, generator=generator) * 0.02).to(dtype) for k, v in net.state_dict().items()}
        for name, net in nets.items()
    }


def write_checkpoints(folder: Path, layouts: list[str], preset: str, dtype: torch.dtype) -> dict[str, Path]:
    from sdlab.checkpoints import save_diffusers, save_single_file
    from sdlab.config import PRESETS

    args = (PRESETS[preset], random_weights(preset, dtype))
    paths = {}
    if "diffusers" in layouts:
        paths["diffusers"] = save_diffusers(folder / f"{preset}-diffusers", *args)
    if "single-file" in layouts:
        paths["single-file"] = save_single_file(folder / f"{preset}.safetensors", *args)
    return paths


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ratio"] = (result["peak_kib"] - result["base_kib"]) * 1024 / result["weight_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=["diffusers", "single-file", "both"], default="both")
    parser.add_argument("--dir", type=Path, help="make the temporary directory here (needs about 9 GB free)")
    parser.add_argument("--preset", default="sd15", help="the shapes of the random weights (e.g. sdxl-base)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                        help="the weights' dtype in the files (SDXL base in fp32 is 14 GB per layout)")
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)  # internal: the writer process
    args = parser.parse_args()
    layouts = ["diffusers", "single-file"] if args.layout == "both" else [args.layout]
    if args.write_only:
        dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        paths = write_checkpoints(args.write_only, layouts, args.preset, dtype)
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        # Linux carries ru_maxrss across fork+exec, so the process that held the random weights must not be
        # the parent of the measuring one: both run as children of this small process.
        writer = [sys.executable, __file__, "--layout", args.layout, "--preset", args.preset, "--dtype", args.dtype,
                  "--write-only", tmp]
        out = subprocess.run(writer, check=True, capture_output=True, text=True).stdout
        paths = json.loads(out.strip().splitlines()[-1])
        for layout, path in paths.items():
            r = measure(Path(path))
            print(
                f"{layout:12s} {r['family']}: weights {r['weight_bytes'] / 2**30:.2f} GiB {args.dtype}; "
                f"RSS after import {r['base_kib'] / 2**20:.2f} GiB; "
                f"peak after load {r['after_load_kib'] / 2**20:.2f} GiB, "
                f"after touching every weight {r['peak_kib'] / 2**20:.2f} GiB; "
                f"(peak - baseline) / weights = {r['ratio']:.3f} (target < 1.3); VmHWM {r['vmhwm_kib'] / 2**20:.2f} GiB"
            )


if __name__ == "__main__":
    main()
