"""Low-memory mode: only the running stage's networks are held in memory (`sdlab.load(path, low_memory=True)`).

A generation uses its networks in stages: the text encoders (the prompt), then the UNet (every sampler
step), then the VAE (the image). Holding only the current stage's networks bounds the peak by the largest
stage instead of the sum: SDXL in bf16 is 6.9 GB of weights, of which the UNet is 5.1 and the two text
encoders 1.6, so a 16 GB machine, or an 8 GB one, runs it.

Between uses a network's weights live at home: the checkpoint's own tensors, memory-mapped from the file
(`Model.load` reads safetensors that way). Those pages belong to the kernel's page cache, not to the
process: once dropped from the process (`perf.release_pages`) they cost nothing the process is charged for,
and reading them again comes from the page cache, or the disk when memory is short. Entering a stage
converts its networks from home to the compute dtype (no copy when the file already has it); packed layers
(`perf.optimize`) convert as they pack, at once when they know their input shape from an earlier pack, else
at their first call. A network goes home when another stage
begins, not when its own ends: the UNet stays between steps, and a stage nested in another (a preview
decoded inside the sampling loop) sends nothing home that the outer one uses. The price is converting and
packing the UNet once per generation (measured in docs/performance.md).

Weights that are not memory-mapped (legacy torch pickles, compressed zips) save nothing this way; loading says so.
LoRAs are merged into the resident weights, which going home would lose: a low-memory model refuses them.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .perf import convert_dtype, in_file_mapping, release_pages

log = logging.getLogger(__name__)


class Residency:
    """Which of a model's networks are in memory, and each one's home (its memory-mapped checkpoint tensors,
    by the network's own state-dict keys). `Model` holds one in low-memory mode; `Model.using(*names)` asks
    it for a stage's networks."""

    def __init__(self, homes: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, device: torch.device):
        self.homes = homes
        self.dtype = dtype  # the compute dtype and device the resident networks have
        self.device = torch.device(device)
        self.resident: set[str] = set()
        self._in_use: Counter[str] = Counter()  # stages entered and not yet left, per network

    @contextmanager
    def using(self, networks: dict[str, nn.Module], names: tuple[str, ...]) -> Iterator[None]:
        """Make `names` resident for the `with` block, first sending home every other resident network that
        no enclosing block uses (a preview decode inside the sampling loop keeps the UNet)."""
        names = tuple(n for n in names if n in self.homes)
        for name in sorted(self.resident - set(names)):
            if not self._in_use[name]:
                self._send_home(name, networks[name])
        for name in names:
            if name not in self.resident:
                self._bring_in(name, networks[name])
        self._in_use.update(names)
        try:
            yield
        finally:
            self._in_use.subtract(names)

    def reset(self, networks: dict[str, nn.Module], dtype: torch.dtype | None, device=None) -> None:
        """Send every network home and give later stages another compute dtype and/or device."""
        if any(self._in_use.values()):
            raise RuntimeError("a low-memory model cannot change dtype or device while it is generating")
        for name in sorted(self.resident):
            self._send_home(name, networks[name])
        self.dtype = dtype or self.dtype
        self.device = torch.device(device) if device is not None else self.device

    def _bring_in(self, name: str, net: nn.Module) -> None:
        # Tensor by tensor, dropping each home tensor's pages; a layer packed before packs again at once, so
        # that the network is never held both plain and packed.
        convert_dtype(net, self.dtype, pack=True)
        net.to(self.device)
        self.resident.add(name)
        log.debug("low memory: %s in memory (%s)", name, self.dtype)

    def _send_home(self, name: str, net: nn.Module) -> None:
        home = self.homes[name]
        for prefix, layer in net.named_modules():
            if getattr(layer, "packed", None) is not None:  # a packed layer (perf.prepack) has no plain weight
                layer.set_weight(home[f"{prefix}.weight" if prefix else "weight"])
        net.load_state_dict(home, strict=True, assign=True)  # the resident copies are freed here
        for tensor in home.values():
            release_pages(tensor)
        _return_freed_memory()
        self.resident.discard(name)
        log.debug("low memory: %s sent home", name)


def check_memory_mapped(homes: dict[str, dict[str, torch.Tensor]], source) -> None:
    """Warn when a component's weights are not memory-mapped: keeping them at home then costs as much memory
    as keeping them resident."""
    for name, state in homes.items():
        tensor = next(iter(state.values()), None)
        if tensor is not None and tensor.device.type == "cpu" and not in_file_mapping(tensor.data_ptr()):
            log.warning("%s: its %s weights are not memory-mapped (a legacy pickle or .bin file), so low-memory mode "
                        "saves little for them; `sdlab convert` writes .safetensors, which it maps", source, name)


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps freed blocks below its mmap threshold, so
    the resident set would not shrink after the networks went home)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to do
            pass
