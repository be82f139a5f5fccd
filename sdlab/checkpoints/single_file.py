"""The original single-file layout (`.ckpt` / `.safetensors` as Stability and CompVis released them).

sdlab's own single files additionally carry the model config and prediction type in their safetensors
metadata, so they load back exactly, without relying on detection's family defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import families
from ..config import ModelConfig
from ..errors import CheckpointError
from . import configs
from .convert import diffusers_to_ldm, ldm_to_diffusers
from .detect import detect_family, resolve_family
from .diffusers_folder import cast
from .io import RawCheckpoint, read_checkpoint, write_safetensors

log = logging.getLogger(__name__)

CONFIG_KEY = "sdlab.config"  # metadata entry holding sdlab's JSON serialisation of the ModelConfig
PREDICTION_KEY = "prediction_type"


def read_single_file(
    path: Path, *, family: str | ModelConfig | None = None, prediction: str | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, diffusers-named state dicts, one per network of its family) of a single-file checkpoint."""
    raw = read_checkpoint(path)
    try:
        config = single_file_config(raw, family=family, prediction=prediction)
        return config, ldm_to_diffusers(raw.tensors, config)
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from e


def single_file_config(raw: RawCheckpoint, *, family=None, prediction: str | None = None) -> ModelConfig:
    """The config of a single file: the `family` given, else the one sdlab stored in it, else detection."""
    if family is not None:
        config = resolve_family(family)
        families.check_claimed_family(config, raw.tensors.keys(), str(raw.path))
    elif CONFIG_KEY in raw.metadata:
        config = configs.config_from_json(raw.metadata[CONFIG_KEY], f"{raw.path} (metadata {CONFIG_KEY!r})",
                                          default_family=lambda: _family_from_keys(raw))
    else:
        return detect_family(raw.tensors, raw.metadata, prediction=prediction)
    return config.replace(prediction=prediction) if prediction else config


def _family_from_keys(raw: RawCheckpoint) -> str:
    """The family of an sdlab file whose stored config predates `ModelConfig.family`, from its keys."""
    return families.detect_single_file(raw.tensors.keys(), str(raw.path)).name


def write_single_file(
    path: Path,
    config: ModelConfig,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the networks as one original-layout `.safetensors` file (atomically)."""
    tensors = cast(diffusers_to_ldm(components, config), dtype)
    metadata = {"format": "pt", PREDICTION_KEY: config.prediction, CONFIG_KEY: configs.config_to_json(config)}
    return write_safetensors(path, tensors, metadata, overwrite=overwrite)
