"""Evaluate a shapes-world model (default: the built-in one) with the shapes evaluator, on prompts that
training never drew, and time one 64x64 image.

    python scripts/eval_builtin.py                           # 200 prompts of each kind, the shipped model
    python scripts/eval_builtin.py --model runs/x/model --n 50 --out runs/eval-x
    python scripts/eval_builtin.py --sheet docs/builtin-contact-sheet.png   # also a small sheet for the docs

Writes, under --out, one folder per prompt kind (`report.txt`, `contact_sheet.png`) and `summary.json`;
prints a markdown table of the issue's targets and of every attribute's accuracy per kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sdlab import rng
from sdlab.generation import sample_batch
from sdlab.model import Model
from sdlab.nn.tiny_vae import load_tiny_decoder
from sdlab.params import GenerationParams
from sdlab.shapes import ATTRIBUTES, contact_sheet, eval_prompts, run_eval

KINDS = ("single", "relation", "heldout")
# The targets: (kind, attributes that must all be right, threshold).
TARGETS = (("single", ("colour", "shape"), 0.95), ("relation", ("all",), 0.80), ("heldout", ("all",), 0.70))


def make_generate_fn(model: Model, params: GenerationParams, seed: int):
    """A `generate_fn(prompts) -> images` for `run_eval`; image i of the whole run uses seed + i."""
    counter = {"next": seed}

    def generate_fn(prompts: list[str]) -> list:
        seeds = list(range(counter["next"], counter["next"] + len(prompts)))
        counter["next"] += len(prompts)
        resolved = params.replace(batch_size=len(prompts)).resolved(model.config)
        result = sample_batch(model, list(prompts), [""] * len(prompts), resolved, rng.generators(seeds))
        return result.images

    return generate_fn


def target_rate(scores: list[dict[str, bool]], attributes) -> float:
    """Share of prompts whose listed attributes were all right (attributes not scored count as right)."""
    return sum(all(s.get(a, True) for a in attributes) for s in scores) / len(scores)


def seconds_per_image(model: Model, params: GenerationParams, repeats: int = 5) -> float:
    """Median wall time of one image (batch 1) at `params`, after a warm-up."""
    one = params.replace(prompt="a red circle above a blue square", batch_size=1, seed=0)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        sample_batch(model, [one.prompt], [""], one.resolved(model.config), rng.generators([0]))
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[repeats // 2]


def markdown(summary: dict) -> str:
    lines = ["| target | measured | goal |", "|---|---|---|"]
    for kind, attributes, goal in TARGETS:
        value = summary["targets"][kind]
        lines.append(f"| {kind}: {' + '.join(attributes)} right | {value:.1%} | >= {goal:.0%} |")
    lines += ["", "| attribute | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for attribute in ATTRIBUTES:
        cells = []
        for kind in KINDS:
            correct, scored = summary["accuracy"][kind].get(attribute, (0, 0))
            cells.append(f"{correct / scored:.1%} ({correct}/{scored})" if scored else "-")
        lines.append(f"| {attribute} | " + " | ".join(cells) + " |")
    errors = summary["count_errors"]
    lines.append("| count errors: too few / too many objects | "
                 + " | ".join(f"{errors[k]['too_few']} / {errors[k]['too_many']}" for k in KINDS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or file (default: the built-in model)")
    parser.add_argument("--n", type=int, default=200, help="prompts per kind")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, default=Path("runs/builtin-eval"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, help="default: the model's own (2 for the built-in model)")
    parser.add_argument("--sampler", default=GenerationParams.sampler)
    parser.add_argument("--schedule", help="default: the model's (karras; automatic for zero-terminal-SNR models)")
    parser.add_argument("--deepcache", type=int, default=1, help="opt-in speedup (see sdlab.deepcache); 1 = off")
    parser.add_argument("--token-merging", type=float, default=0.0, help="opt-in speedup (sdlab.tome); 0 = off")
    parser.add_argument("--tiny-vae", type=Path, help="decode with this tiny VAE decoder (sdlab.nn.tiny_vae)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    parser.add_argument("--quantize", choices=("int8",), help="the UNet in int8 (sdlab.load's quantize)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the images "
                        "(image i of kind k: seed + 10000 k + i)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time", action="store_true", help="also time one 64x64 image")
    parser.add_argument("--sheet", type=Path, help="write a 24-image contact sheet (8 per kind) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = Model.from_name(args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                            quantize=args.quantize)
    if args.tiny_vae:
        model.tiny_decoder = load_tiny_decoder(args.tiny_vae)
    params = GenerationParams(steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, schedule=args.schedule,
                              deepcache=args.deepcache, token_merging=args.token_merging)
    defaults = params.resolved(model.config)  # the model's own CFG scale and schedule where not given
    summary = {"model": str(model.source), "n": args.n, "steps": args.steps, "cfg": defaults.cfg_scale,
               "sampler": args.sampler, "schedule": defaults.schedule, "deepcache": args.deepcache,
               "token_merging": args.token_merging, "dtype": args.dtype, "quantize": args.quantize,
               "tiny_vae": str(args.tiny_vae) if args.tiny_vae else None, "seed": args.seed, "accuracy": {}, "targets": {}}
    sheet_images, sheet_labels = [], []
    for kind in args.kinds:
        prompts = eval_prompts(args.seed, args.n, kind)
        images = []
        # Each kind its own image seeds, so that prompt i of two kinds does not start from the same noise.
        generate = make_generate_fn(model, params, args.seed + 10_000 * KINDS.index(kind))

        def keep(batch, generate=generate, images=images):
            out = generate(batch)
            images.extend(out)
            return out

        report = run_eval(keep, prompts, args.out / kind)
        summary["accuracy"][kind] = report.table.accuracy()
        summary.setdefault("count_errors", {})[kind] = dict(zip(("too_few", "too_many"), report.table.count_errors()))
        attributes, = [a for k, a, _ in TARGETS if k == kind]
        summary["targets"][kind] = target_rate(report.table.scores, attributes)
        sheet_images += images[:8]
        sheet_labels += prompts[:8]
    if args.time:
        summary["seconds_per_image"] = seconds_per_image(model, params)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.sheet:
        contact_sheet(sheet_images, sheet_labels, args.sheet, columns=8, scale=2)
    if len(args.kinds) == len(KINDS):
        print(markdown(summary))
    else:
        print(json.dumps({"targets": summary["targets"], "accuracy": summary["accuracy"]}, indent=1))
    if "seconds_per_image" in summary:
        print(f"one 64x64 image, {args.steps} steps, CFG {defaults.cfg_scale}: {summary['seconds_per_image']:.3f} s")


if __name__ == "__main__":
    main()
