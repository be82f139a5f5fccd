"""LoRA: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA changes a layer's weight W (out, in[, kh, kw]) by   weight * (alpha / rank) * up @ down,   with
down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]). Files use the kohya-ss / A1111 layout:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              ()
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  (text encoder)

i.e. "lora_unet_" / "lora_te_" + the module's diffusers path with dots as underscores. Many files name UNet
modules by the original (LDM) layout instead (`lora_unet_input_blocks_1_1_proj_in`); both are accepted,
translated through the key tables of `sdlab.families.ldm`.

Two uses:
- training: `inject_lora(model, rank)` attaches trainable adapters by forward hooks (the model's own weights
  and state_dict keys stay untouched); `network.save(path)` writes the kohya file.
- generation: `apply_lora(model, path_or_state, weight)` merges a file into the weights and returns a handle
  whose `unmerge()` restores the original tensors exactly (they are kept, not recomputed). Merging goes
  through `sdlab.adapters.patch`, so it works on `sdlab.perf.optimize`d models (packed weights) too.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import families
from .adapters.patch import WeightPatches, read_weight
from .checkpoints.atomic import atomic_write
from .checkpoints.io import read_checkpoint
from .families.ldm import unet_keymap
from .errors import CheckpointError, ParameterError

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"  # the text encoders' prefixes are their family components' (`lora_prefix`)
# Kohya's default targets: every Linear / 1x1 conv inside the UNet's transformers, and the text encoder's
# attention and MLP layers.
UNET_TARGET_PARENT = "attentions"
TEXT_TARGET_PARENTS = ("self_attn", "mlp")

StateDict = dict[str, torch.Tensor]
LoRASource = str | os.PathLike | Mapping[str, torch.Tensor]  # a kohya-format file, or its tensors


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def _ldm_path(path: str, table: Mapping[str, str]) -> str | None:
    """The original-layout path of a diffusers-named UNet module (longest mapped prefix replaced)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in table:
            return ".".join([table[prefix], *parts[end:]])
    return None


def adaptable_modules(model) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d module, for every such layer of the UNet and the text encoder, under both
    the diffusers and the original (LDM) UNet names."""
    names: dict[str, nn.Module] = {}
    to_ldm = {diffusers: original for original, diffusers in unet_keymap(model.config.unet).pairs}
    unet = getattr(model.unet, "_orig_mod", model.unet)  # a torch.compile'd UNet runs its layers' weights as they are
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names[kohya_name(UNET_PREFIX, path)] = module
            ldm = _ldm_path(path, to_ldm)
            if ldm is not None:
                names.setdefault(kohya_name(UNET_PREFIX, ldm), module)
    for prefix, text_encoder in text_encoders(model).items():
        for path, module in text_encoder.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                names[kohya_name(prefix, path)] = module
    return names


def text_encoders(model) -> dict[str, nn.Module]:
    """The model's text encoders by the kohya prefix its family gives each ("lora_te_"; SDXL "lora_te1_"...)."""
    family = families.family_of(model.config)
    return {family.components[name].lora_prefix: getattr(model, name) for name in family.text_encoders}


def default_targets(model, *, text_encoder: bool = False) -> dict[str, nn.Module]:
    """kohya name -> module for the layers LoRA training adapts by default (diffusers names only)."""
    targets = {}
    for path, module in model.unet.named_modules():
        if f".{UNET_TARGET_PARENT}." in f".{path}" and _is_pointwise(module):
            targets[kohya_name(UNET_PREFIX, path)] = module
    for prefix, network in (text_encoders(model).items() if text_encoder else ()):
        for path, module in network.named_modules():
            if isinstance(module, nn.Linear) and any(f".{p}." in f".{path}" for p in TEXT_TARGET_PARENTS):
                targets[kohya_name(prefix, path)] = module
    return targets


def _is_pointwise(module: nn.Module) -> bool:
    """A Linear or a 1x1 conv: the layers of a transformer block (3x3 convs are LoCon's business)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


# --- training: adapters as forward hooks ----------------------------------------------------------------


class LoRAAdapter(nn.Module):
    """x -> (alpha / rank) * up(down(x)) for a Linear or Conv2d `base`; `up` starts at zero so a fresh adapter
    leaves the network unchanged (Hu et al. 2021, sec. 4.1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha = rank, float(alpha)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


class LoRANetwork(nn.Module):
    """Adapters keyed by kohya name, attached to their layers with forward hooks: layer(x) + adapter(x)."""

    def __init__(self, targets: Mapping[str, nn.Module], rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ParameterError(f"LoRA rank={rank} must be at least 1")
        alpha = float(rank if alpha is None else alpha)
        self.adapters = nn.ModuleDict({name: LoRAAdapter(m, rank, alpha) for name, m in targets.items()})
        self._targets = dict(targets)
        self._hooks: list = []
        self.rank, self.alpha = rank, alpha

    def attach(self) -> LoRANetwork:
        self.detach()
        for name, module in self._targets.items():
            adapter = self.adapters[name]
            self._hooks.append(module.register_forward_hook(lambda mod, args, out, a=adapter: out + a(args[0])))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def kohya_state_dict(self) -> StateDict:
        """The adapters in the kohya/A1111 file layout (float32, contiguous)."""
        out = {}
        for name, adapter in self.adapters.items():
            out[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach().float().contiguous()
            out[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach().float().contiguous()
            out[f"{name}.alpha"] = torch.tensor(adapter.alpha)
        return out

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, overwrite: bool = True,
             metadata: Mapping[str, str] | None = None) -> Path:
        """Write the kohya-format `.safetensors` file atomically."""
        from safetensors.torch import save_file

        tensors = {k: v.to(dtype) if k.endswith(".weight") else v for k, v in self.kohya_state_dict().items()}
        info = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha), "sdlab": "1", **(metadata or {})}
        with atomic_write(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=info)
        return Path(path)


def inject_lora(model, rank: int, alpha: float | None = None, *, text_encoder: bool = False) -> LoRANetwork:
    """Attach fresh trainable adapters to the default target layers of `model` (see `default_targets`)."""
    targets = default_targets(model, text_encoder=text_encoder)
    return LoRANetwork(targets, rank, alpha).attach()


# --- generation: merging a file into the weights ----------------------------------------------------------


@dataclass
class LoRAModule:
    """One layer's low-rank update as stored in a file."""

    down: torch.Tensor  # (rank, in[, kh, kw])
    up: torch.Tensor  # (out, rank[, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped as the layer's weight (a Linear's (out, in) and a 1x1
        conv's (out, in, 1, 1) are interchangeable: SD 1.x and 2.x differ there)."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in * kh * kw)
        if product.numel() != math.prod(shape):
            raise CheckpointError(f"a LoRA update of shape {tuple(product.shape)} does not fit a weight {tuple(shape)}")
        return product.reshape(shape) * (self.alpha / self.rank)


@dataclass
class MergedLoRA:
    """The handle `apply_lora` returns: which layers it changed (with their exact previous weights)."""

    patches: WeightPatches = field(default_factory=WeightPatches)
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def unmerge(self) -> None:
        """Restore every changed weight bit for bit. Unmerge stacked LoRAs in reverse order of applying."""
        self.patches.restore()

    def __enter__(self) -> MergedLoRA:
        return self

    def __exit__(self, *exc) -> None:
        self.unmerge()


def read_lora(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, LoRAModule]:
    """A kohya-format LoRA (file path or state dict) -> kohya module name -> LoRAModule."""
    where = str(source) if isinstance(source, (str, os.PathLike)) else "LoRA state dict"
    state = read_checkpoint(source).tensors if isinstance(source, (str, os.PathLike)) else dict(source)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = value
    modules, unsupported = {}, []
    for name, parts in groups.items():
        if "lora_down.weight" in parts and "lora_up.weight" in parts:
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
            modules[name] = LoRAModule(down, up, alpha)
        else:
            unsupported.append(f"{name} ({', '.join(sorted(parts))})")
    if unsupported:
        log.warning("%s: %d entries are not plain LoRA (lora_down/lora_up) and are ignored, e.g. %s",
                    where, len(unsupported), unsupported[:3])
    if not modules:
        raise CheckpointError(f"{where}: no kohya-format LoRA weights (keys like "
                              f"'lora_unet_..._to_q.lora_down.weight' / '.lora_up.weight' / '.alpha') found")
    return modules


@torch.no_grad()
def apply_lora(model, source: str | os.PathLike | Mapping[str, torch.Tensor], weight: float = 1.0) -> MergedLoRA:
    """Merge a LoRA into `model` (an `sdlab.Model`): W += weight * alpha / rank * up @ down for each layer.

    Returns a `MergedLoRA` whose `unmerge()` restores the weights exactly. Entries naming no layer of this
    model (e.g. an SDXL LoRA's second text encoder) are skipped with a warning; if none applies, raises
    `CheckpointError`.
    """
    lora = read_lora(source)
    layers = adaptable_modules(model)
    handle = MergedLoRA()
    try:
        for name, update in lora.items():
            layer = layers.get(name)
            if layer is None:
                handle.skipped.append(name)
                continue
            _merge_into(layer, update, weight, handle, name)
            handle.applied.append(name)
    except BaseException:  # a bad module half-way: leave the model as it was
        handle.unmerge()
        raise
    _report(source, handle)
    return handle


def _merge_into(layer: nn.Module, update: LoRAModule, weight: float, handle: MergedLoRA, name: str) -> None:
    current = read_weight(layer)  # (out, in[, kh, kw]); a packed layer's is an unpacked copy
    try:
        delta = update.delta(current.shape)
    except CheckpointError as e:
        raise CheckpointError(f"LoRA module {name}: {e}") from None
    # in float32, rounded once to the layer's dtype (bf16/fp16 weights would lose the small update otherwise)
    handle.patches.replace(layer, (current.float() + weight * delta.to(current.device)).to(current.dtype))


def _report(source, handle: MergedLoRA) -> None:
    where = str(source) if isinstance(source, (str, os.PathLike)) else "LoRA state dict"
    if handle.skipped:
        log.warning("%s: %d LoRA modules match no layer of this model and are ignored, e.g. %s",
                    where, len(handle.skipped), handle.skipped[:3])
    if not handle.applied:
        handle.unmerge()
        raise CheckpointError(
            f"{where}: none of its {len(handle.skipped)} LoRA modules matches a layer of this model "
            f"(e.g. {handle.skipped[:2]}); is it for another architecture (SDXL, SD 2.x vs 1.x)?"
        )
    log.info("%s: merged %d LoRA modules", where, len(handle.applied))
