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
    """A JSON-ready summary: layout, family (registry name, label, the config's name), prediction, native
    size and default guidance, each network's shape (SDXL: the UNet's added vector, bigG's projection, the
    VAE's force_upcast), dtypes, parameter counts by component, hash."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    check_checkpoint(ckpt)
    config = ckpt.config
    weights = ckpt.weights  # a state dict per component of the family
    family = families.family_of(config)
    text_encoders = family.text_encoders
    info = {
        "path": str(path),
        "layout": "diffusers" if path.is_dir() else "single-file",
        "family": family.name,  # the registry's name ("sd1", "sdxl", "sdxl-refiner", ...)
        "family_label": family.label,
        "config": config.name,  # the preset the config was read as (or the name a folder's config gives)
        "inpainting": config.is_inpainting,
        "prediction": config.prediction,
        "native_size": config.default_size,
        "default_guidance": config.default_guidance,
        "unet": {"channels": list(config.unet.channels), "in_channels": config.unet.in_channels,
                 "context_dim": config.unet.context_dim, "layers_per_block": config.unet.layers_per_block,
                 **_added_condition(config.unet)},
        "text_encoders": text_encoders,  # each also has an entry of its own, by component name
        **{name: _text_encoder(config.network(name)) for name in text_encoders},
        "vae": {"channels": list(config.vae.channels), "latent_channels": config.vae.latent_channels,
                "downscale": config.vae.downscale, "scaling_factor": config.vae.scaling_factor,
                "force_upcast": config.vae.force_upcast},
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


def _added_condition(unet) -> dict:
    """SDXL's added vector (pooled text + `added_time_ids` numbers, each as `added_time_dim` Fourier
    features, into an MLP of input width `added_input_dim`); nothing for UNets without one."""
    if unet.added_condition is None:
        return {}
    return {"added_condition": unet.added_condition, "added_input_dim": unet.added_input_dim,
            "added_time_ids": unet.added_time_ids,
            "pooled_dim": unet.added_input_dim - unet.added_time_ids * unet.added_time_dim}


def _text_encoder(config) -> dict:
    out = {"width": config.width, "layers": config.num_layers}
    if config.projection_dim is not None:  # SDXL's bigG: its pooled output is projected
        out["projection_dim"] = config.projection_dim
    return out


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
    unet, vae = info["unet"], info["vae"]
    added = (f", added {unet['added_condition']} vector (pooled text {unet['pooled_dim']} + "
             f"{unet['added_time_ids']} numbers)" if "added_condition" in unet else "")
    lines = [
        f"path:        {info['path']} ({info['layout']}, {info['bytes'] / 2**20:.1f} MiB)",
        (f"family:      {info['family_label']}{' (inpainting)' if info['inpainting'] else ''} "
         f"[{info['family']}, config {info['config']}]"),
        f"prediction:  {info['prediction']}",
        f"native size: {info['native_size']}x{info['native_size']} (default CFG scale {info['default_guidance']:g})",
        (f"unet:        channels {unet['channels']}, in_channels {unet['in_channels']}, "
         f"context {unet['context_dim']}{added}"),
        *[f"{_label(n)}width {info[n]['width']}, {info[n]['layers']} layers"
          + (f", projection {info[n]['projection_dim']}" if "projection_dim" in info[n] else "")
          for n in info["text_encoders"]],
        (f"vae:         channels {vae['channels']}, downscale {vae['downscale']}, scaling {vae['scaling_factor']}"
         + (", force_upcast (decode in fp32: it overflows in fp16)" if vae["force_upcast"] else "")),
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
