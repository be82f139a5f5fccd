"""Retrain sdlab's built-in model from scratch on the shapes world: the VAE, then the UNet and text encoder,
then ship the EMA weights as an fp16 diffusers folder in `sdlab/data/builtin/`.

    python scripts/train_builtin.py                          # the whole recipe (resumes where it stopped)
    python scripts/train_builtin.py --stage unet --unet-steps 8000   # shorter (cools down over its last 3000)
    python scripts/train_builtin.py --stage ship             # ship the newest UNet checkpoint's EMA weights

The recipe is data, in `sdlab/shapes/recipe/`: `model.json` (the architecture), `vae.json` and `unet.json`
(the two `TrainConfig`s, with their seeds). Runs go to `--out` (default `runs/builtin`, git-ignored); both
stages checkpoint periodically and resume, so the command can be interrupted and run again. The UNet
stage's learning rate is constant after warm-up and decays linearly over the last `cooldown_steps`; steps
before the cool-down do not depend on `steps`, so raising `--unet-steps` on a run that has not reached its
cool-down yet lengthens it without changing any step already taken. Wall-clock time per stage is appended to
`<out>/times.jsonl`.
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
    """The recipe's TrainConfig for stage `name` ("vae" or "unet"), writing under `out/name`."""
    values = json.loads((RECIPE / f"{name}.json").read_text())
    values.update(model=str(RECIPE / "model.json"), output_dir=str(out / name))
    if name == "unet":
        values["vae_from"] = str(out / "vae" / "model")
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
    """Write the EMA weights of the newest (or the given) UNet checkpoint as an fp16 diffusers folder.

    Reads the checkpoint directly rather than through a Trainer, so shipping never touches the run's files
    (a Trainer's resume would cut its loss log back to the checkpoint's step)."""
    path = checkpoint or CheckpointManager(Path(config.output_dir) / "checkpoints", config.keep_last).latest()
    if path is None:
        raise SystemExit(f"no UNet checkpoint in {config.output_dir}: train the 'unet' stage first")
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
    parser.add_argument("--stage", choices=("all", "vae", "unet", "ship"), default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "builtin", help="run folder (checkpoints)")
    parser.add_argument("--vae-steps", type=int, help="override vae.json's steps")
    parser.add_argument("--unet-steps", type=int, help="override unet.json's steps (raise it to train further)")
    parser.add_argument("--checkpoint", help="ship this UNet checkpoint instead of the newest")
    parser.add_argument("--ship-to", type=Path, default=None, help="default: sdlab/data/builtin")
    # One thread: on a shared 2-core machine two OpenMP threads waiting on each other were 4x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "vae"):
        train(stage_config("vae", args.out, steps=args.vae_steps), args.out, "vae")
    unet_config = stage_config("unet", args.out, steps=args.unet_steps)
    if args.stage in ("all", "unet"):
        train(unet_config, args.out, "unet")
    if args.stage in ("all", "ship"):
        target = args.ship_to or ROOT / "sdlab" / "data" / "builtin"
        ship(unet_config, target, args.checkpoint)


if __name__ == "__main__":
    main()
