"""Which model is this? Reading a `ModelConfig` off an original-layout (single-file) state dict.

The registry (`sdlab.families`) finds the one family whose keys these are; the family then reads the sizes
off the tensor shapes (so non-standard models work: other widths, levels, layers per block) and supplies
what shapes cannot tell (attention heads, the noise schedule, the VAE scaling, the prediction rule). See
`sdlab.families.ldm` for the shared rules and each family's module for its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import families
from ..config import ModelConfig
from ..errors import CheckpointError, ParameterError
from .configs import named_like_preset

SUPPORTED_FAMILIES = families.SUPPORTED


def detect_family(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    prediction: str | None = None,
    where: str = "the checkpoint",
) -> ModelConfig:
    """The ModelConfig of an original-layout state dict (exactly one family must recognise it)."""
    family = families.detect_single_file(state_dict.keys(), where)
    try:  # the configs check their sizes: shapes of a damaged file can give impossible ones
        config = family.config_from_state_dict(state_dict, metadata or {}, prediction)
    except ParameterError as e:
        raise CheckpointError(f"unknown architecture: the weights' shapes give an unsupported model ({e})") from e
    name = f"{family.name}-custom" + ("-inpaint" if config.is_inpainting else "")
    return named_like_preset(config, name)


def resolve_family(family: str | ModelConfig) -> ModelConfig:
    """A preset name ("sd15", "sd21", ...) or a ModelConfig -> ModelConfig."""
    if isinstance(family, ModelConfig):
        return family
    if family not in families.PRESETS:
        raise CheckpointError(f"unknown family {family!r}; choose one of {sorted(families.PRESETS)}")
    return families.PRESETS[family]
