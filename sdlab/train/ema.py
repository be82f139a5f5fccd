"""Exponential moving average of the trained weights (Polyak averaging; as used for DDPM by Ho et al. 2020).

shadow <- decay * shadow + (1 - decay) * param after every optimizer step, with the decay warmed up as
min(decay, (1 + n) / (10 + n)) so the average is not dominated by the random initialisation early on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """An averaged copy of `params` (name -> Parameter). `swapped_in()` uses it temporarily in place."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {name: p.detach().clone().float() for name, p in params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; afterwards exactly their own again."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the trained parameters: {sorted(missing)[:5]}")
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
