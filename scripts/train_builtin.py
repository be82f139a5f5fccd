"""Retrain sdlab's built-in model from scratch on the shapes world: the VAE, then the UNet and text encoder,
then a refining stage on a mix with more two-shape scenes, then ship the EMA weights as an fp16 diffusers
folder in `sdlab/data/builtin/`.

    python scripts/train_builtin.py                          # the whole recipe (resumes where it stopped)
    python scripts/train_builtin.py --stage unet --unet-steps 8000   # shorter (cools down over its last 3000)
    python scripts/train_builtin.py --stage ship             # ship the newest refine checkpoint's EMA weights

The recipe is data, in `sdlab/shapes/recipe/`: `model.json` (the architecture), `vae.json`, `unet.json`
and `refine.json` (the three stages' `TrainConfig`s, with their seeds). The refine stage starts from the
UNet stage's exported EMA weights (`<out>/unet/model`) with a fresh optimizer and trains on a data mix
that leans towards what the UNet stage's model gets wrong (two shapes and their relation; refine.json's
`shapes_object_weights` and `shapes_relation_share`). Runs go to `--out` (default `runs/builtin`,
git-ignored); every stage checkpoints periodically and resumes, so the command can be interrupted and run
again. The diffusion stages' learning rate is constant after warm-up and decays linearly over the last
`cooldown_steps`; steps before the cool-down do not depend on `steps`, so raising `--unet-steps` on a run
that has not reached its cool-down yet lengthens it without changing any step already taken. Wall-clock
time per stage is appended to `<out>/times.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sdlab.train import TrainConfig, Trainer
from sdlab.train.loop import build_model
from sdlab.train.state import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "sdlab" / "shapes" / "recipe"
log = logging.getLogger("train_builtin")


def stage_config(name: str, out: Path, **changes) -> TrainConfig:
    """The recipe's TrainConfig for stage `name` ("vae", "unet" or "refine"), writing under `out/name`."""
    values = json.loads((RECIPE / f"{name}.json").read_text())
    values.update(model=str(RECIPE / "model.json"), output_dir=str(out / name))
    if name == "unet":
        values["vae_from"] = str(out / "vae" / "model")
    if name == "refine":
        values["init_from"] = str(out / "unet" / "model")
    values.update({k: v for k, v in changes.items() if v is not None})
    return TrainConfig.from_dict(values, where=str(RECIPE / f"{name}.json"))


def train(config: TrainConfig, out: Path, name: str) -> None:
    """Run (or resume) one stage and record how long this invocation took."""
    started = time.perf_counter()
    trainer = Trainer(config)
    first = trainer.step
    result = trainer.run()
    seconds = time.perf_counter() - started
    record = {"stage": name, "from_step": first, "to_step": result.step, "seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "metrics": result.metrics}
    with open(out / "times.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("%s: steps %d -> %d in %.0f s", name, first, result.step, seconds)


def ship(config: TrainConfig, target: Path, checkpoint: str | None = None) -> Path:
    """Write the EMA weights of the newest (or the given) checkpoint of `config`'s stage as an fp16 diffusers
    folder.

    Reads the checkpoint directly rather than through a Trainer, so shipping never touches the run's files
    (a Trainer's resume would cut its loss log back to the checkpoint's step)."""
    path = checkpoint or CheckpointManager(Path(config.output_dir) / "checkpoints", config.keep_last).latest()
    if path is None:
        raise SystemExit(f"no checkpoint in {config.output_dir}: train that stage first")
    state = CheckpointManager.load(path)
    model = build_model(config)
    for name, weights in state["trained"].items():
        getattr(model, name).load_state_dict(weights)
    if state["ema"] is not None:  # shadow names are "<network>.<parameter>", as the objective names them
        with torch.no_grad():
            for key, value in state["ema"]["shadow"].items():
                network, _, parameter = key.partition(".")
                getattr(model, network).get_parameter(parameter).copy_(value)
    saved = model.save(target, layout="diffusers", dtype=torch.float16, overwrite=True)
    log.info("shipped %s (step %d, EMA weights) to %s", path, state["step"], saved)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "vae", "unet", "refine", "ship"), default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "builtin", help="run folder (checkpoints)")
    parser.add_argument("--vae-steps", type=int, help="override vae.json's steps")
    parser.add_argument("--unet-steps", type=int, help="override unet.json's steps (raise it to train further)")
    parser.add_argument("--refine-steps", type=int, help="override refine.json's steps")
    parser.add_argument("--refine-from", type=Path,
                        help="start the refine stage from this saved model instead of <out>/unet/model")
    parser.add_argument("--checkpoint",
                        help="ship this checkpoint (of either diffusion stage) instead of the newest refine one")
    parser.add_argument("--ship-to", type=Path, default=None, help="default: sdlab/data/builtin")
    # One thread: on a shared 2-core machine two OpenMP threads waiting on each other were 4x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "vae"):
        train(stage_config("vae", args.out, steps=args.vae_steps), args.out, "vae")
    if args.stage in ("all", "unet"):
        train(stage_config("unet", args.out, steps=args.unet_steps), args.out, "unet")
    refine_from = str(args.refine_from) if args.refine_from else None
    refine_config = stage_config("refine", args.out, steps=args.refine_steps, init_from=refine_from)
    if args.stage in ("all", "refine"):
        train(refine_config, args.out, "refine")
    if args.stage in ("all", "ship"):
        target = args.ship_to or ROOT / "sdlab" / "data" / "builtin"
        ship(refine_config, target, args.checkpoint)


if __name__ == "__main__":
    main()
