"""Model families, one module each, and the registry that tells which one a file is.

    family = families.detect_single_file(state_dict, where="model.safetensors")   # exactly one, or an error
    family = families.family_of(config)            # the family a ModelConfig belongs to (config.family)
    latents = families.latent_format(config)       # scale/shift/channels: latents.to_diffusion(z) ...
    family.keymaps(config), family.components, family.presets, family.condition(model, prompts) ...

Detection asks every registered family whether a file is one of its own and must find exactly one:
none is "unknown architecture" (with a hint where the file is of a family sdlab does not have yet), two
or more name the candidates (so the families' rules can be made sharper, never first-match order).
Adding a family is one module here plus one entry in `_REGISTERED`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..config import ModelConfig
from ..errors import CheckpointError
from . import sd1, sd2, sdxl
from .base import Component, Family, KeyMap, LatentFormat
from .ldm import UNET_ROOT
from .sd1 import SD15, SD15_INPAINT, TINY
from .sd2 import SD2_INPAINT, SD21, SD21_BASE
from .sdxl import SDXL_BASE, SDXL_INPAINT, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER

__all__ = [
    "Family", "KeyMap", "Component", "LatentFormat", "latent_format", "FAMILIES", "PRESETS", "family_of",
    "get_family", "detect_single_file", "check_claimed_family",
    "detect_folder", "SUPPORTED", "SD15", "SD15_INPAINT", "SD21_BASE", "SD21", "SD2_INPAINT", "TINY",
    "SDXL_BASE", "SDXL_INPAINT", "SDXL_REFINER", "TINY_SDXL", "TINY_SDXL_REFINER",
]  # fmt: skip

_REGISTERED: tuple[Family, ...] = (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, sdxl.REFINER)
FAMILIES: dict[str, Family] = {f.name: f for f in _REGISTERED}
PRESETS: dict[str, ModelConfig] = {c.name: c for f in _REGISTERED for c in f.presets}

# Files that are not (whole) models of any family: recognised only to say what they are, by a key prefix
# of the original single-file layout.
NOT_SUPPORTED_KEYS = {
    "control_model.": "a ControlNet (give it as a ControlNet, not as a model)",
    "controlnet_cond_embedding.": "a ControlNet in the diffusers layout (give it as a ControlNet, not as a model)",
    "lora_unet_": "a LoRA (use it with <lora:name:weight> or GenerationParams.loras)",
    "lora_te_": "a LoRA (use it with <lora:name:weight> or GenerationParams.loras)",
}
# Upscaler architectures (ESRGAN and relatives) have neither a UNet nor a VAE; their usual first layers.
UPSCALER_KEYS = ("conv_first.weight", "model.0.weight", "body.0.rdb1.conv1.weight")


def supported() -> str:
    """The families sdlab reads, for error messages."""
    labels = ", ".join(f.label for f in _REGISTERED)
    return (f"{labels}, and their 9-channel inpainting variants, in the original single-file layout "
            f"(model.diffusion_model. / first_stage_model. / cond_stage_model. or conditioner.) or as a "
            f"diffusers folder")


SUPPORTED = supported()


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; sdlab has {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: ModelConfig) -> Family:
    return get_family(config.family)


def latent_format(config: ModelConfig) -> LatentFormat:
    """How `config`'s VAE latents map to diffusion latents and back (`to_diffusion` / `from_diffusion`)."""
    return family_of(config).latent_format(config)


def detect_single_file(keys: Collection[str], where: str = "the checkpoint") -> Family:
    """The one family whose original-layout keys these are."""
    matches = _matching(keys)
    if not matches:
        what = _what_else(keys)
        if what:
            raise CheckpointError(f"{where}: not a model sdlab can load: this looks like {what}. "
                                  f"sdlab loads {SUPPORTED}")
    return _exactly_one(matches, where, f"({len(keys)} keys)")


def _matching(keys: Collection[str]) -> list[Family]:
    """The families whose original-layout keys these are."""
    return [f for f in _REGISTERED if f.matches_keys(keys)]


def _what_else(keys: Collection[str]) -> str | None:
    """What a single file that no family matched seems to be, for the error message."""
    for family in _REGISTERED:
        if explanation := family.explain_mismatch(keys):
            return explanation
    for prefix, what in NOT_SUPPORTED_KEYS.items():
        if any(k.startswith(prefix) for k in keys):
            return what
    if any(k in keys for k in UPSCALER_KEYS) and not any(k.startswith(UNET_ROOT) for k in keys):
        return "an image upscaler (ESRGAN-style), not a diffusion model"
    if any(k.startswith(UNET_ROOT + "label_emb.") for k in keys):
        return "a class- or size-conditioned UNet of a family sdlab does not have (e.g. the x4 upscaler)"
    return None


def check_claimed_family(claimed: ModelConfig, keys: Collection[str] | None, where: str, *,
                         detected: Family | None = None) -> None:
    """A family named by the caller (`family=`) must be the one the files are: the one family whose keys
    these are (single files; a file no family or several families claim is left to the caller's word) or
    the folder's `detected` family. Reading an SDXL refiner as a base, say, is an error naming both."""
    if detected is None:
        matches = _matching(keys)
        detected = matches[0] if len(matches) == 1 else None
    if detected is not None and detected.name != claimed.family:
        raise CheckpointError(
            f"{where}: this is a model of {detected.label}; it cannot be read as {claimed.name!r} (a preset of "
            f"{get_family(claimed.family).label}). Leave family= out, or pick one of "
            f"{[p.name for p in detected.presets]}")


def detect_folder(index: Mapping[str, Any], component_configs: Mapping[str, Mapping[str, Any]],
                  where: str) -> Family:
    """The one family of a diffusers folder, from its model_index.json and component configs."""
    matches = [f for f in _REGISTERED if f.matches_folder(index, component_configs)]
    return _exactly_one(matches, where, "(its model_index.json and component configs)")


def _exactly_one(matches: list[Family], where: str, what: str) -> Family:
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CheckpointError(f"{where}: unknown architecture: no model family matches {what}. "
                              f"sdlab supports {SUPPORTED}")
    names = ", ".join(f.name for f in matches)
    raise CheckpointError(f"{where}: ambiguous architecture: it matches more than one model family ({names}); "
                          f"pass family= (a preset name: {', '.join(PRESETS)})")
