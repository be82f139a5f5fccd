"""What is this checkpoint? A summary of a diffusers folder or single file, for `sdlab info`.

Reads the weights memory-mapped (nothing is computed on them, only shapes and dtypes are looked at), checks
them against the networks their config describes exactly as `sdlab.load` does (on the meta device, so a file
that `load` would refuse is refused here too), and hashes the file(s) that `sdlab.fingerprint` hashes for the
"Model hash" field.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from . import families
from .checkpoints import load_checkpoint
from .fingerprint import checkpoint_sha256, hashed_files, short_hash
from .model import check_checkpoint


def describe_checkpoint(path: str | os.PathLike, *, hash_files: bool = True) -> dict:
    """A JSON-ready summary: layout, family, prediction, sizes, dtypes, parameter counts, hash."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    check_checkpoint(ckpt)
    config = ckpt.config
    weights = ckpt.weights  # a state dict per component of the family
    text_encoders = families.family_of(config).text_encoders
    info = {
        "path": str(path),
        "layout": "diffusers" if path.is_dir() else "single-file",
        "family": config.name,
        "inpainting": config.is_inpainting,
        "prediction": config.prediction,
        "native_size": config.default_size,
        "unet": {"channels": list(config.unet.channels), "in_channels": config.unet.in_channels,
                 "context_dim": config.unet.context_dim, "layers_per_block": config.unet.layers_per_block},
        "text_encoders": text_encoders,  # each also has an entry of its own, by component name
        **{name: {"width": config.network(name).width, "layers": config.network(name).num_layers}
           for name in text_encoders},
        "vae": {"channels": list(config.vae.channels), "latent_channels": config.vae.latent_channels,
                "downscale": config.vae.downscale, "scaling_factor": config.vae.scaling_factor},
        "dtypes": {name: _dtypes(sd) for name, sd in weights.items()},
        "parameters": {name: _count(sd) for name, sd in weights.items()},
        "bytes": sum(f.stat().st_size for f in _all_files(path)),
    }
    info["parameters"]["total"] = sum(info["parameters"].values())
    if hash_files:
        full = checkpoint_sha256(path)
        info["sha256"], info["hash"] = full, short_hash(full)
        info["hashed_files"] = [str(f) for f in hashed_files(path)]
    return info


def _dtypes(state: dict) -> dict[str, int]:
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    return dict(counts.most_common())


def _count(state: dict) -> int:
    return sum(t.numel() for t in state.values())


def _all_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def format_info(info: dict) -> str:
    """The summary as aligned human-readable lines."""
    p = info["parameters"]
    lines = [
        f"path:        {info['path']} ({info['layout']}, {info['bytes'] / 2**20:.1f} MiB)",
        f"family:      {info['family']}{' (inpainting)' if info['inpainting'] else ''}",
        f"prediction:  {info['prediction']}",
        f"native size: {info['native_size']}x{info['native_size']}",
        (f"unet:        channels {info['unet']['channels']}, in_channels {info['unet']['in_channels']}, "
         f"context {info['unet']['context_dim']}"),
        *[f"{_label(n)}width {info[n]['width']}, {info[n]['layers']} layers" for n in info["text_encoders"]],
        (f"vae:         channels {info['vae']['channels']}, downscale {info['vae']['downscale']}, "
         f"scaling {info['vae']['scaling_factor']}"),
        "dtypes:      " + "; ".join(f"{k} {_fmt_counts(v)}" for k, v in info["dtypes"].items()),
        "parameters:  " + ", ".join(f"{name} {count:,}" for name, count in p.items()),  # the last is the total
    ]
    if "sha256" in info:
        lines.append(f"sha256:      {info['sha256']} (short hash {info['hash']})")
    return "\n".join(lines)


def _label(name: str) -> str:
    """'text_encoder' -> 'text enc.:   ', 'text_encoder_2' -> 'text enc. 2: ' (aligned with the other lines)."""
    number = name.removeprefix("text_encoder").removeprefix("_")
    return f"text enc.{' ' + number if number else ''}:".ljust(13)


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {dtype}" for dtype, n in counts.items())
