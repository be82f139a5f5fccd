"""Training: data, the diffusion and VAE objectives, the loop, checkpoints, EMA, many processes.

    from sdlab.train import Trainer, TrainConfig
    Trainer(TrainConfig(model="tiny", data="shapes", steps=500, output_dir="runs/tiny")).run()
"""

from .config import (
           TrainConfig,
           model_config_from_dict,
           model_config_to_json,
           resolve_model_config,
)
from .loop import Trainer, TrainResult

__all__ = [
           "TrainConfig",
           "TrainResult",
           "Trainer",
           "model_config_from_dict",
           "model_config_to_json",
           "resolve_model_config",
]
