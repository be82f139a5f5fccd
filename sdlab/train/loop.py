"""The trainer: one loop for every task, on one process or many (torchrun + DistributedDataParallel).

    result = Trainer(TrainConfig(model="tiny", steps=200, output_dir="runs/x")).run()

Per optimizer step: `grad_accum` micro-batches, each a global batch of batch_size x processes items that
every process cuts its share from; the random draws of the whole global batch come from one generator that
all processes advance alike. AdamW (Loshchilov & Hutter 2019) with linear warm-up and cosine decay, gradient
clipping, EMA, bf16 autocast. Checkpoints capture everything (see `state.py`), so "K steps" and "k steps,
kill, resume, K - k steps" give identical weights on a CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import families
from ..errors import ParameterError
from ..model import Model
from . import distributed, sharding
from .config import TrainConfig, model_config_to_dict, resolve_model_config
from .data import (
    BatchOrder,
    DataStream,
    ImageFolderDataset,
    ShapesSource,
    collate,
    make_buckets,
)
from .ema import EMA
from .latents import LatentCache, fingerprint
from .progress import LossLog, ProgressBar, image_grid, plot_loss_curve
from .sampling import sample_images
from .state import CheckpointManager, capture_rng, restore_rng, weights_fingerprint
from .tasks import DiffusionTask, VAETask

log = logging.getLogger(__name__)

# Settings that may change when a run is resumed; any other difference means another experiment.
RESUMABLE_CHANGES = {"steps", "save_every", "keep_last", "log_every", "eval_every", "sample_every", "sample_prompts",
                     "sample_steps", "sample_guidance", "export_layouts", "progress_bar", "resume", "output_dir",
                     "device", "cooldown_steps",  # like steps: both say where the run ends
                     "sharding"}  # the same numbers either way (checkpoints are whole in both)


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    exported: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, device: torch.device | str = "cpu") -> Model:
    """The model a run starts from: `init_from` weights, or fresh weights of the `model` architecture."""
    if config.init_from:
        model = Model.load(config.init_from, device=device, plain=True)  # trainable weights, not packed ones
    else:
        model = Model.build(resolve_model_config(config.model), device=device)
    if config.vae_from:
        vae_source = Model.load(config.vae_from, plain=True)
        model.vae.load_state_dict(vae_source.vae.state_dict())
        model.config = model.config.replace(vae=vae_source.config.vae)
    if config.prediction:
        model.config = model.config.replace(prediction=config.prediction)
    return model


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of `lr` at optimizer step `step`: linear warm-up, then constant (with an optional linear
    cool-down over the last `cooldown_steps`) or cosine decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        cooldown_start = config.steps - config.cooldown_steps
        if step < cooldown_start:
            return 1.0
        progress = (step + 1 - cooldown_start) / config.cooldown_steps  # reaches 1 at the last step
        return 1.0 - (1 - config.min_lr_ratio) * min(1.0, progress)
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_source(config: TrainConfig, model: Model):
    """(train source, held-out source) of the configured data."""
    if config.data == "shapes":
        train = ShapesSource(config.resolution, config.shapes_length, seed=config.seed, mix=config.shapes_mix)
        return train, ShapesSource(config.resolution, config.eval_size, seed=config.seed, split="heldout")
    buckets = make_buckets(config.resolution, _size_multiple(model)) if config.buckets else None
    folder = ImageFolderDataset(config.data, config.resolution, center_crop=config.center_crop,
                                random_flip=config.random_flip, buckets=buckets, seed=config.seed)
    log.info("%s: %d images (%d skipped)", config.data, len(folder), folder.skipped.total)
    return folder.split(config.eval_fraction, seed=config.seed) if config.task == "vae" else (folder, None)


def _size_multiple(model: Model) -> int:
    return model.config.vae.downscale * 2 ** (len(model.config.unet.channels) - 1)


class Trainer:
    """Sets a run up (model, data, task, optimizer, resume) on construction; `run()` trains to `config.steps`.

    `callbacks` are called as callback(trainer) after every optimizer step (and its checkpoint, if any).
    """

    def __init__(self, config: TrainConfig, *, model: Model | None = None, source=None,
                 callbacks: Sequence[Callable[[Trainer], None]] = ()):
        self.config, self.callbacks = config, list(callbacks)
        self.dist = distributed.setup(config.device)
        self.out = Path(config.output_dir)
        seed_everything(config.seed)
        self.model = (model or build_model(config)).to(self.dist.device)
        self.source, self.eval_source = (source, None) if source is not None else make_source(config, self.model)
        self._check_resolution()
        self.task = self._make_task()
        self.task.objective.to(self.dist.device)  # its own buffers and modules (schedule, discriminator)
        self.fsdp = config.sharding == "fsdp" and self.dist.enabled
        if self.fsdp:  # before the optimizer: it must hold the sharded parameters
            sharding.shard(self.task.trained)
        self.params = {n: p for n, p in self.task.objective.named_parameters() if p.requires_grad}
        # FSDP: the optimizer and EMA work on this rank's shards of the parameters, as plain tensors.
        self.shards = sharding.Shards(self.params) if self.fsdp else None
        updated = self.shards.local if self.fsdp else self.params
        # fused=True: one kernel per step instead of ~10 per tensor (a tenth of a small model's step time).
        self.optimizer = torch.optim.AdamW(updated.values(), lr=config.lr, betas=config.adam_betas,
                                           eps=config.adam_eps, weight_decay=config.weight_decay,
                                           fused=self.dist.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.ema = EMA(updated, config.ema_decay) if config.ema_decay > 0 else None
        self.global_batch = config.batch_size * self.dist.world_size
        self.stream = DataStream(BatchOrder(len(self.source), self.global_batch, config.seed,
                                            getattr(self.source, "sizes", None)))
        self.step_rng = torch.Generator().manual_seed(config.seed + 1)
        self.objective = self._wrap(self.task.objective)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", config.keep_last)
        if self.dist.is_main:
            self.checkpoints.remove_stale_temporaries()  # of a save killed part-way in an earlier run
        self.loss_log = LossLog(self.out / "loss.jsonl")
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        if config.resume and self.checkpoints.latest() is not None:
            self.resume(self.checkpoints.latest())

    # --- setup ------------------------------------------------------------------------------------------

    def _check_resolution(self) -> None:
        config = self.config
        multiple = _size_multiple(self.model) if config.task == "diffusion" else self.model.config.vae.downscale
        if config.resolution % multiple:
            raise ParameterError(
                f"TrainConfig.resolution={config.resolution} must be a multiple of {multiple} for this model "
                f"(VAE downscale x UNet levels); try {max(multiple, config.resolution // multiple * multiple)}"
            )

    def _make_task(self):
        if self.config.task == "vae":
            return VAETask(self.config, self.model, self._eval_pixels())
        return DiffusionTask(self.config, self.model, self._latent_cache())

    def _eval_pixels(self) -> torch.Tensor | None:
        if self.eval_source is None:
            return None
        n = min(self.config.eval_size, len(self.eval_source))
        items = [self.eval_source.load(i) for i in range(n)]
        by_size: dict = {}
        for item in items:  # PSNR needs one tensor: keep the most common size (buckets)
            by_size.setdefault(tuple(item["pixels"].shape), []).append(item["pixels"])
        return torch.stack(max(by_size.values(), key=len))

    def _latent_cache(self) -> LatentCache | None:
        if not self.config.cache_latents:
            return None
        vae = self.model.vae
        key = fingerprint(vae, self.source, self.config.resolution)
        path = self.out / "latent_cache.safetensors"
        if self.dist.is_main and LatentCache.load(path, key) is None:
            self.out.mkdir(parents=True, exist_ok=True)
            LatentCache.build(self.source, vae, device=self.dist.device).save(path, key)
        distributed.barrier(self.dist)
        return LatentCache.load(path, key)

    def _wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.enabled or self.fsdp:  # FSDP: the sharded networks inside do the communication
            return objective
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=self._some_unused())

    def _some_unused(self) -> bool:
        """Whether some trained parameters may get no gradient in a step, which DDP must be told: the
        discriminator before `disc_start`; a text encoder's layers past the one the family conditions on
        (SDXL's CLIP ViT-L: its last layer, since only the penultimate one is used)."""
        c = self.config
        if c.task == "vae":
            return c.disc_weight > 0
        return c.train_text_encoder or (c.uses_lora and c.lora_text_encoder)

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        bar = ProgressBar(config.steps, self.step, enabled=config.progress_bar and self.dist.is_main)
        speed = None
        while self.step < config.steps:
            started = time.perf_counter()
            loss, metrics = self.train_step()
            rate = self.global_batch * config.grad_accum / max(time.perf_counter() - started, 1e-9)
            speed = rate if speed is None else 0.9 * speed + 0.1 * rate
            bar.update(loss, speed)
            self._after_step(loss, metrics, speed)
        bar.close()
        return self._finish()

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step over `grad_accum` micro-batches; returns this process's mean loss and metrics."""
        config, total, metrics = self.config, 0.0, {}
        for micro in range(config.grad_accum):
            batch, noise = self._next_micro_batch()
            sync = micro == config.grad_accum - 1 or not self.dist.enabled
            with self._gradient_sync(sync), self._autocast():
                loss, parts = self.objective(*self.task.inputs(batch, noise, self.step))
            (loss / config.grad_accum).backward()
            total += float(loss.detach()) / config.grad_accum
            for k, v in parts.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / config.grad_accum
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        if self.shards is not None:
            self.shards.pull_grads()
        if config.max_grad_norm > 0:
            metrics["grad_norm"] = self._clip(config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.shards is not None:
            self.shards.clear_grads()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return total, metrics

    def _next_micro_batch(self):
        """This process's share of the next global micro-batch, and its share of the draws."""
        epoch, indices = self.stream.next()
        start = self.dist.rank * self.config.batch_size
        mine = indices[start : start + self.config.batch_size]
        batch = collate([self.source.load(i, epoch) for i in mine])
        batch["index"] = mine
        noise = self.task.draw(self.step_rng, len(indices), batch["pixels"].shape)
        return batch, noise.rows(start, start + len(mine))

    def _clip(self, max_norm: float) -> float:
        if self.shards is not None:
            return self.shards.clip_grad_norm_(max_norm)
        return float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm))

    def _gradient_sync(self, sync: bool):
        """Whether this micro-batch's backward averages gradients across processes (the last of a step)."""
        if sync or not self.dist.enabled:
            return nullcontext()
        if self.fsdp:
            return sharding.gradient_sync(list(self.task.trained.values()), False)
        return self.objective.no_sync()

    def _autocast(self):
        enabled = self.config.precision == "bf16"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _after_step(self, loss: float, metrics: dict[str, float], speed: float) -> None:
        config, step = self.config, self.step
        if step % config.log_every == 0 or step == config.steps:
            self._log(loss, metrics, speed)
        if config.eval_every and step % config.eval_every == 0:
            self._log_eval()
        if config.sample_every and step % config.sample_every == 0 and (self.dist.is_main or self.fsdp):
            self.save_samples()
        if config.save_every and step % config.save_every == 0:
            self.save_checkpoint()
        for callback in self.callbacks:
            callback(self)

    def _log(self, loss: float, metrics: dict[str, float], speed: float) -> None:
        values = torch.tensor([loss, *metrics.values()], dtype=torch.float64)
        values = distributed.mean_across(self.dist, values).tolist()
        record = {"step": self.step, "epoch": self.stream.epoch, "loss": values[0],
                  **dict(zip(metrics, values[1:])), "samples_per_s": speed}
        self.last_metrics = record
        if self.dist.is_main:
            self.loss_log.append(record)

    def _log_eval(self) -> None:
        values = self.task.evaluate()
        if values and self.dist.is_main:
            self.loss_log.append({"step": self.step, **values})
            log.info("step %d: %s", self.step, values)
        self.last_metrics.update(values)

    # --- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a checkpoint holds. With FSDP a collective (every rank calls it) that gathers whole
        tensors onto rank 0, where it is complete (the other ranks' copies lack the gathered parts)."""
        return {
            "config": self.config.to_dict(),
            "model_config": model_config_to_dict(self.model.config),
            "trained": {name: self._module_state(module) for name, module in self.task.trained.items()},
            "frozen": weights_fingerprint(self.task.frozen),
            "ema": self._ema_state(),
            "optimizer": (self.shards.whole_optimizer(self.optimizer.state_dict(), list(self.params))
                          if self.fsdp else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(),
            "rng": capture_rng({"step": self.step_rng}),
        }

    def _module_state(self, module: torch.nn.Module) -> dict:
        return sharding.gather_model(module) if self.fsdp else module.state_dict()

    def _ema_state(self) -> dict | None:
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        if self.fsdp:  # whole averages, gathered (on the CPU, as the networks' are)
            state["shadow"] = self.shards.whole_tensors(state["shadow"])
        return state

    def save_checkpoint(self) -> Path | None:
        path = None
        state = self.state_dict() if self.dist.is_main or self.fsdp else None
        if self.dist.is_main:
            path = self.checkpoints.save(self.step, state)
        distributed.barrier(self.dist)
        return path

    def resume(self, path: str | Path) -> None:
        state = CheckpointManager.load(path)
        self._check_same_run(state, path)
        for name, module in self.task.trained.items():
            (sharding.load_model if self.fsdp else type(module).load_state_dict)(module, state["trained"][name])
        if self.ema is not None:
            ema = state["ema"]
            if self.fsdp:  # each rank keeps its shard of the whole averages
                ema = {**ema, "shadow": {n: self.shards.shard(n, t) for n, t in ema["shadow"].items()}}
            self.ema.load_state_dict(ema)
        optimizer = state["optimizer"]
        if self.fsdp:
            optimizer = self.shards.sharded_optimizer(optimizer, list(self.params))
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        restore_rng(state["rng"], {"step": self.step_rng})
        self.step = int(state["step"])
        if self.dist.is_main:
            self.loss_log.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _check_same_run(self, state: dict, path) -> None:
        saved, now = state["config"], self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(now[k]))
        if changed:
            raise ParameterError(
                f"{path}: the checkpoint belongs to a run with other settings ({', '.join(changed)}); use another "
                "output_dir, or resume=False to start over"
            )
        fingerprint_now = weights_fingerprint(self.task.frozen)
        for name, value in state["frozen"].items():
            if not math.isclose(value, fingerprint_now.get(name, math.nan), rel_tol=1e-9, abs_tol=1e-9):
                raise ParameterError(f"{path}: the frozen {name} differs from the one this run was trained with")

    # --- outputs ------------------------------------------------------------------------------------------

    def save_samples(self) -> Path | None:
        """A grid of the sample prompts (EMA weights if any) as `samples/step-N.png`."""
        if self.config.task == "vae" or not self.config.sample_prompts:
            return None
        with self._ema_weights(), _eval_mode(self.model):  # FSDP: every rank samples (collectives)
            images = sample_images(self.model, list(self.config.sample_prompts), size=self.config.resolution,
                                   steps=self.config.sample_steps, guidance=self.config.sample_guidance)
        if not self.dist.is_main:
            return None
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=min(4, len(images))).save(path)
        return path

    def _ema_weights(self):
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def _finish(self) -> TrainResult:
        if self.config.eval_every == 0:
            self._log_eval()
        if self.checkpoints.latest() != self.checkpoints.path(self.step):
            self.save_checkpoint()
        exported = []
        if self.fsdp:
            exported = self._export_sharded()
        elif self.dist.is_main:
            with self._ema_weights(), _eval_mode(self.model):  # export the averaged weights, if any
                exported = self.task.export(self.out, self.config.export_layouts)
        if self.dist.is_main:
            plot_loss_curve(self.loss_log.read(), self.out / "loss.png")
        distributed.barrier(self.dist)
        return TrainResult(self.step, self.out, exported, dict(self.last_metrics))

    def _export_sharded(self) -> list[Path]:
        """FSDP: gather the (averaged) weights onto rank 0 and export a model of plain networks holding them."""
        if not self.config.export_layouts:
            return []
        with self._ema_weights():
            states = {name: sharding.gather_model(module) for name, module in self.task.trained.items()}
        if not self.dist.is_main:
            return []
        family, config = families.family_of(self.model.config), self.model.config
        networks = dict(self.model.components)
        for name, state in states.items():
            networks[name] = sharding.plain_copy(networks[name], lambda n=name: family.components[n].build(config),
                                                 state).to(self.dist.device)
        model = Model(config, self.model.tokenizers, networks, self.model.source)
        with _eval_mode(model):
            return self.task.export(self.out, self.config.export_layouts, model=model)

    def close(self) -> None:
        distributed.teardown(self.dist)


class _eval_mode:
    """Put the model's networks in eval mode and no-grad inside the block; restore their modes after."""

    def __init__(self, model: Model):
        self.nets = list(model.components.values())

    def __enter__(self):
        self.modes = [net.training for net in self.nets]
        for net in self.nets:
            net.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for net, mode in zip(self.nets, self.modes):
            net.train(mode)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
