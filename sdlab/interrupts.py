"""Stopping a generation part-way, inside the networks as well as between sampler steps.

A sampler checks its `interrupt` callable before every step, which is enough when a step takes a fraction
of a second. It is not when one network pass takes minutes (a large VAE decode, one UNet step at 2048x2048
on a CPU): `abort_between_blocks` makes every module of the given networks (each conv, linear, norm,
attention, block and level) check an `abort` callable as it is entered, and raise `GenerationAborted`
when it says so. Long attentions run in chunks of queries (`sdlab.nn.layers.query_chunk`), each entering
its projection modules again, so no single call between two checks lasts more than a second or so.
SD 1.5's UNet has ~700 modules: the checks cost well under a millisecond per pass. The networks stay
plain modules: the check is a forward pre-hook that lives for one call and is removed afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from .errors import SdlabError


class GenerationAborted(SdlabError):
    """`abort()` returned True while a network ran: the generation stopped between two of its blocks."""


@contextlib.contextmanager
def abort_between_blocks(networks: Iterable[nn.Module | None], abort: Callable[[], bool] | None) -> Iterator[None]:
    """While active, entering any module of `networks` first asks `abort()`; True raises GenerationAborted."""
    if abort is None:
        yield
        return

    def check(module: nn.Module, args) -> None:
        if abort():
            raise GenerationAborted(f"stopped on request before {type(module).__name__}")

    handles = [m.register_forward_pre_hook(check) for net in networks if net is not None for m in net.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
