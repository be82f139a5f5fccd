"""Retrain sdlab's built-in model from scratch on the shapes world: the VAE, then the UNet and text encoder,
then two refining stages on mixes with more two-shape scenes, then ship the EMA weights as an fp16 diffusers
folder in `sdlab/data/builtin/`.

    python scripts/train_builtin.py                               # the whole recipe (resumes where it stopped)
    python scripts/train_builtin.py --stage unet --steps 8000     # a shorter stage (cools down over its last 3000)
    python scripts/train_builtin.py --stage polish --init-from path/to/model   # polish another model
    python scripts/train_builtin.py --stage ship                  # ship the newest polish checkpoint's EMA weights

The recipe is data, in `sdlab/shapes/recipe/`: `model.json` (the architecture) and one `TrainConfig` per
stage, with its seed: `vae.json`, `unet.json`, `refine.json`, `polish.json`. The UNet stage encodes its
images with the VAE stage's export (`<out>/vae/model`); each later stage starts from the previous stage's
exported EMA weights (`<out>/<previous>/model`) with a fresh optimizer and trains on a data mix that leans
towards what the previous model gets wrong (two shapes and their relation: `shapes_object_weights` and
`shapes_relation_share`). Runs go to `--out` (default `runs/builtin`, git-ignored); every stage checkpoints
periodically and resumes, so the command can be interrupted and run again. The diffusion stages' learning
rate is constant after warm-up and decays linearly over the last `cooldown_steps`; steps before the cool-down
do not depend on `steps`, so raising `--steps` on a stage that has not reached its cool-down yet lengthens it
without changing any step already taken. Wall-clock time per stage is appended to `<out>/times.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sdlab.train import TrainConfig, Trainer, resolve_model_config
from sdlab.train.loop import build_model
from sdlab.train.state import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "sdlab" / "shapes" / "recipe"
log = logging.getLogger("train_builtin")


# The training stages in order; each diffusion stage after "unet" starts from the one before it.
STAGES = ("vae", "unet", "refine", "polish")


def stage_config(name: str, out: Path, **changes) -> TrainConfig:
    """The recipe's TrainConfig for stage `name` (one of STAGES), writing under `out/name`."""
    values = json.loads((RECIPE / f"{name}.json").read_text())
    values.update(model=str(RECIPE / "model.json"), output_dir=str(out / name))
    if name == "unet":
        values["vae_from"] = str(out / "vae" / "model")
    elif name != "vae":
        values["init_from"] = str(out / STAGES[STAGES.index(name) - 1] / "model")
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
    # A stage started from an earlier export inherits that export's generation defaults; the shipped model
    # gets the recipe's current ones (model.json's default_guidance, chosen on the evaluator: docs).
    model.config = model.config.replace(default_guidance=resolve_model_config(config.model).default_guidance)
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
    parser.add_argument("--stage", choices=("all", *STAGES, "ship"), default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "builtin", help="run folder (checkpoints)")
    parser.add_argument("--steps", type=int,
                        help="override the stage's steps (raise it to train further); needs a single --stage")
    parser.add_argument("--init-from", type=Path,
                        help="start the stage (refine or polish) from this saved model instead of the previous "
                             "stage's export; with --stage ship, the model whose VAE is shipped")
    parser.add_argument("--checkpoint",
                        help="ship this checkpoint (of any diffusion stage) instead of the newest polish one")
    parser.add_argument("--ship-to", type=Path, default=None, help="default: sdlab/data/builtin")
    # One thread: on a shared 2-core machine two OpenMP threads waiting on each other were 4x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.steps is not None and args.stage in ("all", "ship"):
        parser.error("--steps applies to one training stage: name it with --stage")
    if args.init_from is not None and args.stage in ("all", "vae", "unet"):
        parser.error("--init-from applies to --stage refine, polish or ship (vae and unet start from scratch)")
    args.out.mkdir(parents=True, exist_ok=True)
    init_from = str(args.init_from) if args.init_from else None
    for name in STAGES:
        if args.stage in ("all", name):
            train(stage_config(name, args.out, steps=args.steps, init_from=init_from), args.out, name)
    if args.stage in ("all", "ship"):
        # The last stage's config gives the architecture and, through init_from, the VAE to ship with.
        target = args.ship_to or ROOT / "sdlab" / "data" / "builtin"
        ship(stage_config(STAGES[-1], args.out, init_from=init_from), target, args.checkpoint)


if __name__ == "__main__":
    main()
