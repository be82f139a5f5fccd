"""Batch jobs from a prompt file, split across processes (`torchrun`) without losing or repeating any.

Prompt k (0-based, counting non-empty lines) goes to process `k % WORLD_SIZE` and is generated with seed
`base + k * images_per_prompt` (its images: that seed + 0, 1, ...). Neither depends on the number of
processes, so a run on 1 process and a run on 8 make the same images under the same names' seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ParameterError


@dataclass(frozen=True)
class PromptJob:
    index: int  # position in the prompt file (non-empty lines)
    prompt: str
    seed: int


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ParameterError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ParameterError(f"--prompts {path}: the file has no prompts (one per line)")
    return prompts


def process_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) when run alone."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ParameterError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ParameterError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world


def shard(prompts: list[str], base_seed: int, images_per_prompt: int, rank: int, world: int) -> list[PromptJob]:
    """This process's share of the prompts, each with its seed."""
    return [PromptJob(k, p, base_seed + k * images_per_prompt) for k, p in enumerate(prompts) if k % world == rank]
