"""Reading and writing Stable Diffusion checkpoints: diffusers folders and original single files.

    ckpt = load_checkpoint("v1-5-pruned-emaonly.safetensors")   # or a diffusers folder
    ckpt.config          # ModelConfig, detected from the weights (or read from config.json)
    ckpt.weights         # {"unet": ..., "vae": ..., "text_encoder": ...}: the family's components, diffusers-
                         # named state dicts, memory-mapped where possible (also as ckpt.unet, ckpt.vae...)
    save_diffusers("out/", ckpt.config, ckpt.weights, dtype=torch.float16)

Modules: `io` (safe reading by content), `convert` (the dict -> dict converters over the key map tables that
the families declare, `sdlab.families`), `detect` (which family is this file?), `configs` (config.json <-> dataclasses),
`diffusers_folder`, `single_file`, `atomic` (atomic writes).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import families
from ..config import ModelConfig
from ..errors import CheckpointError, ParameterError
from .atomic import DestinationExistsError, atomic_folder, atomic_write
from .convert import diffusers_to_ldm, ldm_to_diffusers
from .detect import SUPPORTED_FAMILIES, detect_family, resolve_family
from .diffusers_folder import cast, is_diffusers_folder, read_folder, write_folder
from .io import check_path, read_checkpoint, read_state_dict
from .single_file import read_single_file, write_single_file

__all__ = [
    "LoadedCheckpoint", "load_checkpoint", "save_diffusers", "save_single_file", "read_state_dict",
    "read_checkpoint", "detect_family", "ldm_to_diffusers", "diffusers_to_ldm", "atomic_write", "atomic_folder",
    "DestinationExistsError", "SUPPORTED_FAMILIES",
]  # fmt: skip

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclass
class LoadedCheckpoint:
    """A checkpoint's config and its networks' weights, named as sdlab's (= diffusers') modules.

    `weights` has one state dict per component of the config's family; `ckpt.unet`, `ckpt.vae`... read it.
    """

    config: ModelConfig
    weights: dict[str, StateDict]
    # The folder's tokenizer folders by name ("tokenizer", "tokenizer_2"), those it has (single files: none).
    tokenizer_dirs: dict[str, Path]
    source: Path

    @property
    def tokenizer_dir(self) -> Path | None:
        """The first text encoder's tokenizer folder, or None."""
        return next(iter(self.tokenizer_dirs.values()), None)

    def __getattr__(self, name: str) -> StateDict:
        weights = self.__dict__.get("weights", {})
        if name in weights:
            return weights[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or component {name!r}")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    family: str | ModelConfig | None = None,
    prediction: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Read a diffusers folder or a single-file checkpoint (`.safetensors`, `.ckpt`, `.bin`, by content).

    `family` (a preset name such as "sd15"/"sd21", or a ModelConfig) replaces detection; `prediction`
    ("epsilon" or "v_prediction") overrides what the files say or what detection assumes (see
    `sdlab.checkpoints.detect`); `variant` picks e.g. the `fp16` files of a diffusers folder; `dtype`
    converts floating-point weights (otherwise they keep the file's dtype and stay memory-mapped).
    """
    path = Path(path)
    _check_prediction(prediction)
    if stat.S_ISDIR(check_path(path).st_mode):  # (a missing path or a symlink loop is reported here)
        config, weights, tokenizer_dirs = _load_folder(path, family, prediction, variant)
    else:
        if variant:
            log.warning("%s: variant=%r ignored: it applies to diffusers folders only", path, variant)
        config, weights = read_single_file(path, family=family, prediction=prediction)
        tokenizer_dirs = {}
    weights = {name: cast(sd, dtype) for name, sd in weights.items()}
    log.info("loaded %s as %s (%s)", path, config.name, config.prediction)
    return LoadedCheckpoint(config, weights, tokenizer_dirs, path)


def save_diffusers(
    folder: str | os.PathLike,
    config: ModelConfig,
    weights: Mapping[str, StateDict],
    *,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers folder (loadable by `StableDiffusionPipeline.from_pretrained`), atomically; an
    existing folder is replaced only with `overwrite=True`. `weights`: a state dict per component of the
    config's family (`ckpt.weights`, or {"unet": ..., "vae": ..., "text_encoder": ...})."""
    return write_folder(Path(folder), config, _all_components(config, weights), dtype=dtype, variant=variant,
                        overwrite=overwrite)


def save_single_file(
    path: str | os.PathLike,
    config: ModelConfig,
    weights: Mapping[str, StateDict],
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one original-layout `.safetensors` file, atomically; an existing file is replaced only with
    `overwrite=True`. `weights` as for `save_diffusers`."""
    return write_single_file(Path(path), config, _all_components(config, weights), dtype=dtype,
                             overwrite=overwrite)


def _all_components(config: ModelConfig, weights: Mapping[str, StateDict]) -> Mapping[str, StateDict]:
    expected = list(families.family_of(config).components)
    if not isinstance(weights, Mapping) or sorted(weights) != sorted(expected):
        raise ParameterError(f"weights must be a state dict for each of the components {expected}, by name")
    return weights


def _load_folder(path: Path, family, prediction, variant):
    if not is_diffusers_folder(path):
        raise CheckpointError(
            f"{path}: a folder without model_index.json; give a diffusers folder or a single checkpoint file"
        )
    config, weights, tokenizer_dirs = read_folder(path, variant=variant)
    if family is not None:  # the folder's config files say what it is; a different family is an error
        families.check_claimed_family(resolve_family(family), None, str(path),
                                      detected=families.family_of(config))
    if prediction:
        config = config.replace(prediction=prediction)
    return config, weights, tokenizer_dirs


def _check_prediction(prediction: str | None) -> None:
    if prediction not in (None, "epsilon", "v_prediction"):
        raise ParameterError(f"prediction={prediction!r}: use 'epsilon' or 'v_prediction'")
