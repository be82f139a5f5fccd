"""What the opt-in speedups that change the image (and the lower precisions) cost in prompt adherence: the built-in model's evaluator
(scripts/eval_builtin.py, same prompts and seeds) with each speedup against the plain run, and the time per
64x64 image. For their speed on SD 1.5-sized models see `benchmarks/inference.py --variants
sdlab,sdlab-deepcache3,sdlab-tome50,diffusers`.

    python benchmarks/quality_speedups.py              # 100 prompts of each kind per setting
    python benchmarks/quality_speedups.py --n 200 --markdown runs/quality_speedups.md
    python benchmarks/quality_speedups.py --only bf16 "bf16, UNet in int8"   # the precisions only
    python benchmarks/quality_speedups.py --tiny-vae runs/tiny-decoder   # also a tiny VAE decoder
                                                    # (scripts/train_tiny_decoder.py distils one)

Every setting runs in its own subprocess (scripts/eval_builtin.py --time), one after another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # label -> eval_builtin.py flags
    "plain": [],
    "DeepCache, interval 2": ["--deepcache", "2"],
    "DeepCache, interval 3": ["--deepcache", "3"],
    "token merging 0.3": ["--token-merging", "0.3"],
    "token merging 0.5": ["--token-merging", "0.5"],
    "bf16": ["--dtype", "bf16"],
    "bf16, UNet in int8": ["--dtype", "bf16", "--quantize", "int8"],
}
TARGETS = (("single", "colour + shape"), ("relation", "all"), ("heldout", "all"))


def run(label: str, flags: list[str], args) -> dict:
    out = args.out / label.replace(" ", "_").replace(",", "")
    command = [sys.executable, str(ROOT / "scripts" / "eval_builtin.py"), "--n", str(args.n), "--out", str(out),
               "--threads", str(args.threads), "--time", *flags]
    if args.model:
        command += ["--model", args.model]
    print(f"{label}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def table(results: dict[str, dict]) -> str:
    plain = results["plain"]
    lines = ["| setting | " + " | ".join(f"{k}: {a}" for k, a in TARGETS) + " | s / image | speed vs plain |",
             "|---|" + "---|" * (len(TARGETS) + 2)]
    for label, summary in results.items():
        cells = []
        for kind, _ in TARGETS:
            value, base = summary["targets"][kind], plain["targets"][kind]
            cells.append(f"{value:.1%}" + ("" if label == "plain" else f" ({100 * (value - base):+.1f})"))
        seconds = summary["seconds_per_image"]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {seconds:.3f} | {plain['seconds_per_image'] / seconds:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="prompts per kind")
    parser.add_argument("--model", help="default: the built-in model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quality_speedups")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--tiny-vae", help="also measure this tiny VAE decoder")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="these settings only (plain always)")
    args = parser.parse_args()
    settings = {label: flags for label, flags in SETTINGS.items()
                if not args.only or label == "plain" or label in args.only}
    if args.tiny_vae:
        settings["tiny VAE decoder"] = ["--tiny-vae", args.tiny_vae]
    results = {label: run(label, flags, args) for label, flags in settings.items()}
    text = table(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
