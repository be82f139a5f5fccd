"""Pure dict -> dict converters between the original single-file layout and the diffusers layout.

Both directions read the same key map tables, which each family declares (`sdlab.families`). Tensors are
passed through without copying (renamed, or viewed with another shape); only joining q/k/v into OpenCLIP's fused matrix must allocate. Every key is
accounted for: a key under a network's prefix that no table entry covers, or a table entry that no key
fills, raises `CheckpointError` listing them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .. import families
from ..config import ModelConfig
from ..errors import CheckpointError
from ..families.base import Component, KeyMap
from ..families.ldm import block_index
from .io import quoted_key

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
TEXT_MODEL = "text_model."
FUSED_QKV = ("q_proj", "k_proj", "v_proj")  # the order of the three blocks of a fused in_proj_weight
MAX_PREFIX_PARTS = 32  # the longest table prefix has 7 dot-separated parts


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, StateDict]:
    """Split an original single-file state dict into diffusers-named state dicts, one per network of the
    config's family ({"unet", "vae", "text_encoder"} for SD 1.x/2.x)."""
    family = families.family_of(config)
    state_dict = family.normalize_keys(state_dict)
    maps = family.keymaps(config)
    out = {name: _component_to_diffusers(state_dict, maps[name], name) for name in family.components}
    roots = tuple(km.root for km in maps.values())
    others = [k for k in state_dict if not k.startswith(roots)]
    if others:
        log.info("ignored %d keys outside the networks (EMA copies, schedule buffers...), e.g. %s",
                 len(others), others[:3])
    return out


def diffusers_to_ldm(components: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig) -> StateDict:
    """Join diffusers-named state dicts, one per network of the config's family, into one original-layout
    state dict."""
    family = families.family_of(config)
    maps = family.keymaps(config)
    missing = [name for name in maps if name not in components]
    if missing:
        raise CheckpointError(f"diffusers_to_ldm: missing components {missing}; give all of {list(maps)}")
    out: StateDict = {}
    for name, km in maps.items():
        out.update(_component_to_ldm(normalize_component_keys(family.components[name], components[name]), km, name))
    return out


# --- key normalisation ----------------------------------------------------------------------------------


def normalize_component_keys(component: Component, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A network's diffusers-layout keys as sdlab names them: transformers models' keys normalised
    (`normalize_text_encoder_keys`), diffusers models' kept."""
    if component.library == "transformers":
        return normalize_text_encoder_keys(state_dict)
    return dict(state_dict)


def normalize_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers-layout text encoder keys as sdlab (and SD's published files) name them: with the
    `text_model.` prefix that transformers >= 5 no longer writes, and without the constant `position_ids`."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        kept = key.startswith((TEXT_MODEL, "text_projection."))  # the projection sits beside text_model
        out[key if kept else TEXT_MODEL + key] = value
    return out


# --- one network, original -> diffusers -----------------------------------------------------------------


def _component_to_diffusers(state_dict: Mapping[str, torch.Tensor], km: KeyMap, name: str) -> StateDict:
    table = {km.root + a: b for a, b in km.pairs}
    fused = {km.root + stem: module for stem, module in km.fused_qkv}
    out, unmapped, used = {}, [], set()
    transposed = {km.root + a: b for a, b in km.transposed}
    for key, value in state_dict.items():
        if not key.startswith(km.root) or _ignored(key, km):
            continue
        if key in transposed:  # (in, out) as OpenCLIP applies it -> a Linear weight (out, in), a view
            out[transposed.pop(key)] = value.T
            continue
        if _split_fused(key, value, fused, out):
            used.add(key.rsplit("_", 1)[0])
            continue
        prefix = _longest_prefix(key, table)
        if prefix is None:
            unmapped.append(key)
            continue
        new_key = table[prefix] + key[len(prefix):]
        out[new_key] = _to_linear(value) if new_key.rsplit(".", 1)[0] in km.conv1x1 else value
        used.add(prefix)
    _check_coverage(name, "original", unmapped,
                    [p for p in list(table) + list(fused) if p not in used] + list(transposed))
    return out


def _ignored(key: str, km: KeyMap) -> bool:
    """Keys the key map declares unused: its `ignored` prefixes, and numbered blocks past `unused_blocks`
    (OpenCLIP's last layer: SD 2 stops at the penultimate)."""
    rest = key[len(km.root):]
    if any(rest == p or rest.startswith(p + ".") for p in km.ignored):
        return True
    return any(rest.startswith(prefix) and block_index(rest, prefix) >= used for prefix, used in km.unused_blocks)


def _split_fused(key: str, value: torch.Tensor, fused: Mapping[str, str], out: StateDict) -> bool:
    """`...attn.in_proj_weight` (3*width, width) -> q_proj/k_proj/v_proj weights (width, width) (views)."""
    stem, _, kind = key.rpartition("_")
    if stem not in fused or kind not in ("weight", "bias"):
        return False
    if value.ndim < 1 or value.shape[0] % 3:
        raise CheckpointError(f"{key}: a fused q/k/v tensor needs 3 x width rows, but has shape {tuple(value.shape)}")
    for part, chunk in zip(FUSED_QKV, value.chunk(3, dim=0), strict=True):
        out[f"{fused[stem]}.{part}.{kind}"] = chunk
    return True


def _to_linear(weight: torch.Tensor) -> torch.Tensor:
    # (C, C, 1, 1) -> (C, C), a view; any other shape is left for the shape check to report
    return weight[:, :, 0, 0] if weight.ndim == 4 and weight.shape[2:] == (1, 1) else weight


# --- one network, diffusers -> original -----------------------------------------------------------------


def _component_to_ldm(state_dict: Mapping[str, torch.Tensor], km: KeyMap, name: str) -> StateDict:
    table = {b: km.root + a for a, b in km.pairs}
    out, unmapped, used = {}, [], set()
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    fused_modules = {module: km.root + stem for stem, module in km.fused_qkv}
    transposed = {b: km.root + a for a, b in km.transposed}
    for key, value in state_dict.items():
        if key in transposed:
            out[transposed.pop(key)] = value.T
            continue
        module, _, part_kind = key.rpartition(".")  # e.g. "...self_attn.q_proj", "weight"
        attention, _, part = module.rpartition(".")
        if attention in fused_modules and part in FUSED_QKV:
            qkv.setdefault(attention, {})[f"{part}.{part_kind}"] = value
            continue
        prefix = _longest_prefix(key, table)
        if prefix is None:
            unmapped.append(key)
            continue
        out[table[prefix] + key[len(prefix):]] = _to_conv1x1(value) if module in km.conv1x1 else value
        used.add(prefix)
    missing = [p for p in table if p not in used] + list(transposed)
    for attention, stem in fused_modules.items():
        missing += _join_fused(qkv.get(attention, {}), attention, stem, out)
    _check_coverage(name, "diffusers", unmapped, missing)
    return out


def _to_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, :, None, None] if weight.ndim == 2 else weight  # (C, C) -> (C, C, 1, 1), a view


def _join_fused(parts: Mapping[str, torch.Tensor], attention: str, stem: str, out: StateDict) -> list[str]:
    """q/k/v weights and biases of one attention -> `in_proj_weight` (3*width, width) and `in_proj_bias`.
    Returns the names of the parts that are missing."""
    missing = []
    for kind in ("weight", "bias"):
        names = [f"{part}.{kind}" for part in FUSED_QKV]
        absent = [f"{attention}.{n}" for n in names if n not in parts]
        if absent:
            missing += absent
            continue
        out[f"{stem}_{kind}"] = torch.cat([parts[n] for n in names], dim=0)
    return missing


# --- shared ---------------------------------------------------------------------------------------------


def _longest_prefix(key: str, table: Mapping[str, str]) -> str | None:
    """The longest prefix of `key` in `table` that ends on a `.` boundary (or is the whole key)."""
    parts = key.split(".")
    for end in range(min(len(parts), MAX_PREFIX_PARTS), 0, -1):  # bounded: a key may be megabytes of dots
        prefix = ".".join(parts[:end])
        if prefix in table:
            return prefix
    return None


def _check_coverage(name: str, layout: str, unmapped: list[str], missing: list[str]) -> None:
    if not unmapped and not missing:
        return
    problems = []
    if unmapped:
        examples = ", ".join(quoted_key(k) for k in unmapped[:4])
        problems.append(f"{len(unmapped)} unexpected keys (no known place in the model), e.g. {examples}")
    if missing:
        problems.append(f"{len(missing)} expected weights are absent, e.g. {missing[:4]}")
    raise CheckpointError(
        f"the {name} weights in the {layout} layout do not match the model config: " + "; ".join(problems)
    )
