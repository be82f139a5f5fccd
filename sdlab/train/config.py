"""`TrainConfig`: the one frozen description of a training run, and the model architecture it trains.

Everything that decides what a run computes lives here, so a run is reproduced by its config plus a seed,
a resumed run can check it continues the same experiment, and the CLI's flags follow from the fields.

The architecture is named by `model`: a preset name ("tiny", "sd15", ...) or the path of a JSON file holding a
`ModelConfig` as nested objects (`model_config_to_json` writes one). `init_from` instead starts from the
weights (and config) of a saved model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..config import (
    PRESETS,
    ModelConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    text_encoder_config_to_dict,
    unet_config_to_dict,
)
from .. import families
from ..errors import ParameterError
from ..shapes.dataset import ShapesMix
from ..shapes.world import OBJECT_COUNT_WEIGHTS

Task = Literal["diffusion", "vae"]
Precision = Literal["no", "bf16"]
LRSchedule = Literal["cosine", "constant"]
ReconLoss = Literal["l1", "l2"]
Sharding = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Batch sizes are per process; the global batch is batch_size * processes * grad_accum."""

    # --- what to train ----------------------------------------------------------------------------------
    task: Task = "diffusion"  # "diffusion": the UNet (and optionally the text encoder); "vae": the autoencoder
    model: str = "tiny"  # a preset name or a ModelConfig JSON file; ignored when init_from is given
    init_from: str | None = None  # a saved model (diffusers folder or single file) to start from
    vae_from: str | None = None  # take the (trained) VAE of this saved model
    prediction: str | None = None  # "epsilon" / "v_prediction"; None keeps the model's
    train_text_encoder: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the full networks
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_text_encoder: bool = False  # also adapt the text encoder's attention and MLP

    # --- data -------------------------------------------------------------------------------------------
    data: str = "shapes"  # "shapes" (the procedural world) or an image folder
    shapes_length: int = 100_000  # number of distinct shapes scenes per epoch
    shapes_object_weights: tuple[float, float, float] = OBJECT_COUNT_WEIGHTS  # weights of 1, 2, 3 shapes
    shapes_relation_share: float = 0.5  # two-shape scenes captioned "a red circle above a blue square"
    resolution: int = 64  # image side (buckets keep about resolution**2 pixels)
    center_crop: bool = True  # False: random crops
    random_flip: bool = False
    buckets: bool = False  # aspect-ratio buckets instead of square crops
    cache_latents: bool = False  # encode every image once (needs a deterministic crop: center, no flip)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (enables CFG)

    # --- optimisation -----------------------------------------------------------------------------------
    steps: int = 1000  # optimizer steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: LRSchedule = "cosine"
    min_lr_ratio: float = 0.0  # the cosine (or the cool-down) decays to lr * min_lr_ratio
    # "constant" only: decay linearly over the last `cooldown_steps` steps (warmup-stable-decay). The steps
    # before the cool-down do not depend on `steps`, so a run can be lengthened and then cooled down.
    cooldown_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables EMA; e.g. 0.999
    precision: Precision = "no"  # "bf16": autocast (CPU and GPU)
    # Under torchrun: "ddp" keeps a whole copy of the trained networks per process (DistributedDataParallel);
    # "fsdp" shards their weights, gradients and optimizer state across processes (FSDP2, `sharding.py`).
    sharding: Sharding = "ddp"
    seed: int = 0

    # --- diffusion objective ----------------------------------------------------------------------------
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0
    offset_noise: float = 0.0  # e.g. 0.05: add per-channel constant noise (Guttenberg 2023)

    # --- VAE objective ----------------------------------------------------------------------------------
    recon_loss: ReconLoss = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # > 0: add a patch-discriminator (PatchGAN) adversarial term
    disc_start: int = 0  # optimizer step at which the discriminator term switches on
    eval_fraction: float = 0.05  # held-out share of an image folder for PSNR (shapes: the heldout split)
    eval_size: int = 32  # held-out images used for PSNR

    # --- outputs ----------------------------------------------------------------------------------------
    output_dir: str = "runs/train"
    save_every: int = 500  # checkpoint interval in optimizer steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10
    eval_every: int = 0  # VAE PSNR interval (0: only at the end)
    sample_every: int = 0  # sample-grid interval (0: never)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle above a yellow star")
    sample_steps: int = 20
    sample_guidance: float = 5.0
    export_layouts: tuple[str, ...] = ("diffusers", "single-file")
    progress_bar: bool = True
    resume: bool = True  # continue from the newest checkpoint in output_dir, if there is one
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self):
        _validate(self)

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def shapes_mix(self) -> ShapesMix:
        """The shapes world's training mix (`data="shapes"`)."""
        return ShapesMix(self.shapes_object_weights, self.shapes_relation_share)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "TrainConfig") -> TrainConfig:
        """Build from plain JSON values (lists become tuples); unknown keys raise `ParameterError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(f"{where}: unknown training settings {unknown}; valid: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(_read_json(path), where=str(path))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ParameterError(f"TrainConfig.{message}")


def _validate(c: TrainConfig) -> None:
    _check(c.task in typing.get_args(Task), f"task={c.task!r}: use one of {typing.get_args(Task)}")
    _check(c.precision in typing.get_args(Precision), f"precision={c.precision!r}: use 'no' or 'bf16'")
    _check(c.sharding in typing.get_args(Sharding),
           f"sharding={c.sharding!r}: use 'ddp' (a whole copy per process) or 'fsdp' (sharded across processes)")
    _check(c.sharding == "ddp" or (c.task == "diffusion" and not c.uses_lora),
           f"sharding='fsdp' shards full networks of diffusion training (task='diffusion', lora_rank=0); "
           f"{'a LoRA' if c.uses_lora else 'task=' + repr(c.task)} trains with sharding='ddp'")
    _check(c.lr_schedule in typing.get_args(LRSchedule), f"lr_schedule={c.lr_schedule!r}: use 'cosine' or 'constant'")
    _check(c.recon_loss in typing.get_args(ReconLoss), f"recon_loss={c.recon_loss!r}: use 'l1' or 'l2'")
    _check(c.prediction in (None, "epsilon", "v_prediction"),
           f"prediction={c.prediction!r}: use 'epsilon', 'v_prediction' or None (the model's)")
    for name in ("steps", "batch_size", "grad_accum", "resolution", "shapes_length", "eval_size", "sample_steps"):
        _check(getattr(c, name) >= 1, f"{name}={getattr(c, name)} must be at least 1")
    _check(c.cooldown_steps == 0 or c.lr_schedule == "constant",
           f"cooldown_steps={c.cooldown_steps}: a cool-down follows the 'constant' schedule only "
           "(the cosine decays already)")
    _check(c.cooldown_steps == 0 or c.warmup_steps + c.cooldown_steps <= c.steps,
           f"warmup_steps + cooldown_steps = {c.warmup_steps + c.cooldown_steps} must not exceed steps={c.steps}")
    for name in ("cooldown_steps", "warmup_steps", "save_every", "log_every", "eval_every", "sample_every", "lora_rank",
                 "disc_start", "min_snr_gamma", "offset_noise", "max_grad_norm", "disc_weight", "kl_weight"):
        _check(getattr(c, name) >= 0, f"{name}={getattr(c, name)} must not be negative")
    _check(c.lr > 0, f"lr={c.lr} must be positive")
    _check(c.keep_last >= 1, f"keep_last={c.keep_last} must be at least 1")
    for name in ("caption_dropout", "min_lr_ratio", "ema_decay"):
        _check(0 <= getattr(c, name) <= 1, f"{name}={getattr(c, name)} must lie in [0, 1]")
    _check(0 < c.eval_fraction < 1, f"eval_fraction={c.eval_fraction} must lie in (0, 1)")
    _check(c.ema_decay < 1, f"ema_decay={c.ema_decay} must be below 1 (0 disables EMA)")
    _check(set(c.export_layouts) <= {"diffusers", "single-file"},
           f"export_layouts={c.export_layouts}: use 'diffusers' and/or 'single-file'")
    _check(not (c.cache_latents and (not c.center_crop or c.random_flip)),
           "cache_latents needs a deterministic crop: set center_crop=True and random_flip=False")
    _check(not (c.uses_lora and c.task == "vae"), "lora_rank applies to diffusion training, not task='vae'")
    _check(not (c.buckets and c.data == "shapes"), "buckets need an image folder; the shapes world is square")
    try:
        c.shapes_mix
    except ParameterError as error:
        raise ParameterError(f"TrainConfig.shapes_object_weights / shapes_relation_share: {error}") from None
    _check(not (c.random_flip and c.data == "shapes"),
           "random_flip would contradict the shapes captions ('left of', 'top right'); leave it off for 'shapes'")


# --- the model architecture -------------------------------------------------------------------------------

_NESTED = {"text_encoder": TextEncoderConfig, "unet": UNetConfig, "vae": VAEConfig, "schedule": ScheduleConfig}


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name ("tiny", "sd15", ...) or the path of a ModelConfig JSON file -> ModelConfig."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        return model_config_from_dict(_read_json(path), where=str(path))
    raise ParameterError(f"model={spec!r} is neither a preset ({sorted(PRESETS)}) nor a ModelConfig JSON file")


def model_config_from_dict(values: dict[str, Any], *, where: str = "ModelConfig") -> ModelConfig:
    """Nested plain values (as `model_config_to_dict` gives) -> ModelConfig; missing fields take defaults."""
    top = dict(values)
    for name, cls in _NESTED.items():
        if top.get(name) is not None:  # the SDXL refiner has no first text encoder (null)
            top[name] = _dataclass_from_dict(cls, top[name], f"{where}: {name}")
    if "extra_networks" in top:
        top["extra_networks"] = _extra_networks(top["extra_networks"], top.get("family", ModelConfig.family), where)
    return _dataclass_from_dict(ModelConfig, top, where)


def _extra_networks(values: Any, family: Any, where: str) -> tuple[tuple[str, Any], ...]:
    """{component name: config fields} -> (name, config) pairs, each of the config class its family declares."""
    if not isinstance(values, dict):
        raise ParameterError(f"{where}: extra_networks must be a JSON object of network configs by component name")
    if family not in families.FAMILIES:
        raise ParameterError(f"{where}: unknown model family; sdlab has {sorted(families.FAMILIES)}")
    components = families.FAMILIES[family].components
    unknown = sorted(set(values) - set(components))
    if unknown:
        raise ParameterError(f"{where}: extra_networks names components {unknown} that its family does not have")
    return tuple((name, _dataclass_from_dict(components[name].config_class, cfg, f"{where}: extra_networks.{name}"))
                 for name, cfg in values.items())


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Nested plain values; the extra networks (if any) as an object by component name."""
    values = dataclasses.asdict(config)
    values["unet"] = unet_config_to_dict(values["unet"])  # SD 1.x/2.x: as before the SDXL fields existed
    if values["text_encoder"] is not None:  # None: the SDXL refiner (bigG only, as text_encoder_2)
        values["text_encoder"] = text_encoder_config_to_dict(values["text_encoder"])
    extra = values.pop("extra_networks")
    return {**values, **({"extra_networks": dict(extra)} if extra else {})}


def model_config_to_json(config: ModelConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(model_config_to_dict(config), indent=2) + "\n")
    return path


def _dataclass_from_dict(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ParameterError(f"{where}: expected a JSON object of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParameterError(f"{where}: unknown {cls.__name__} fields {unknown}; valid: {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as e:
        raise ParameterError(f"{where}: invalid {cls.__name__}: {e}") from e


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such JSON file") from None
    except json.JSONDecodeError as e:
        raise ParameterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ParameterError(f"{path}: expected a JSON object at the top level")
    return values


def field_types() -> dict[str, Any]:
    """The resolved type of each TrainConfig field (for the CLI)."""
    return typing.get_type_hints(TrainConfig)


def is_optional(tp) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
