"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the trained weights, the EMA, the optimizer and LR-schedule states, the step, the data
stream's position and every random number generator (python, numpy, torch CPU/CUDA, and the run's own
generators). Files are `step-00001000.pt` under `<output_dir>/checkpoints/`, written atomically (a crash
never leaves a partial file under the final name); only the newest `keep_last` are kept. They are loaded with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, no pickled code.

A save that fails (a full disk) is a CheckpointError saying how much space it needs; the checkpoints already
written are untouched. A save killed part-way leaves a temporary `.step-00001000.pt.<random>.tmp`, which is
never read and is deleted when the next run in that folder starts.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.atomic import atomic_write
from ..errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")
# The temporary name atomic_write gives a checkpoint while it is written (tempfile's random part: [a-z0-9_]).
_TEMPORARY = re.compile(r"^\.step-\d{8}\.pt\.[a-z0-9_]+\.tmp$")


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

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what saves killed part-way left (sdlab's own temporary names in this folder, nothing else)."""
        if not self.folder.is_dir():
            return []
        stale = [p for p in self.folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("%s: removed %d temporary files of unfinished saves", self.folder, len(stale))
        return stale

    def save(self, step: int, state: dict) -> Path:
        path = self.path(step)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, overwrite=True) as tmp:
                torch.save({"format": FORMAT, "step": step, **state}, tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise self._save_error(path, state, e) from e
        for old in self.all()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        log.info("saved checkpoint %s", path)
        return path

    def _save_error(self, path: Path, state: dict, error: Exception) -> CheckpointError:
        latest = self.latest()
        kept = f"{latest.name} and older checkpoints are intact" if latest else "no checkpoint was written yet"
        needed = max(tensor_bytes(state), latest.stat().st_size if latest else 0)
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            free = None
        out_of_space = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if out_of_space or (free is not None and free < needed):
            room = f"{_mb(free)} are free" if free is not None else "the free space is unknown"
            return CheckpointError(f"{self.folder}: no room to save {path.name}: it needs about {_mb(needed)} and "
                                   f"{room}; free some space and resume ({kept})")
        return CheckpointError(f"{self.folder}: could not save {path.name} ({_reason(error)}); {kept}")

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


def tensor_bytes(value) -> int:
    """The bytes of all tensors in a nested state (dicts, lists, tuples): about a checkpoint's file size."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {first_line[:200]}"
