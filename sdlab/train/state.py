"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the trained weights, the EMA, the optimizer and LR-schedule states, the step, the data
stream's position and every random number generator (python, numpy, torch CPU/CUDA, and the run's own
generators). Files are `step-00001000.pt` under `<output_dir>/checkpoints/`, written atomically (a crash
never leaves a partial file under the final name); only the newest `keep_last` are kept. They are loaded with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, no pickled code.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.atomic import atomic_write
from ..errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """The state of every random number generator a run touches."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def weights_fingerprint(modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """A cheap checksum of weights that a checkpoint does not store (the frozen networks), per network, so a
    resume can tell that it rebuilt the same ones."""
    out = {}
    for name, module in modules.items():
        total = sum(float(t.detach().double().sum()) + 1e-3 * float(t.detach().double().abs().sum())
                    for t in module.state_dict().values() if t.is_floating_point())
        out[name] = total
    return out


class CheckpointManager:
    """Writes, lists, prunes and reads the checkpoints of one run folder."""

    def __init__(self, folder: str | Path, keep_last: int):
        self.folder, self.keep_last = Path(folder), keep_last

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        with atomic_write(path, overwrite=True) as tmp:
            torch.save({"format": FORMAT, "step": step, **state}, tmp)
        for old in self.all()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        log.info("saved checkpoint %s", path)
        return path

    @staticmethod
    def load(path: str | Path) -> dict:
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for damaged files; name the file either way
            raise CheckpointError(f"{path}: not a readable training checkpoint ({e})") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an sdlab training checkpoint (format {FORMAT})")
        return state
