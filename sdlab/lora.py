"""LoRA: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA changes a layer's weight W (out, in[, kh, kw]) by   weight * (alpha / rank) * up @ down,   with
down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]). Two file layouts are read:

kohya-ss / A1111: the component's kohya prefix (`Component.lora_prefix`: "lora_unet_", "lora_te_"; SDXL
"lora_te1_", "lora_te2_") + the module's diffusers path with dots as underscores, and an optional alpha
(none: alpha = rank):

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              ()
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  (text encoder)

Many files name UNet modules by the original (LDM) layout instead (`lora_unet_input_blocks_1_1_proj_in`);
both are accepted, translated through the key tables of the family (`sdlab.families.ldm`).

diffusers / PEFT (LCM-LoRA, most hub LoRAs, `save_lora_weights`): the component's name (`Component.name`:
"unet", "text_encoder", "text_encoder_2") + the module's dotted path, as diffusers' `load_lora_weights`
reads them:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight      (rank, in)  PEFT
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight      (out, rank)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight   diffusers < 0.26
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight  (attn procs)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight            (or .lora_linear_layer.down)
    text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight          (SDXL's second encoder)

Keys without a component name are the UNet's (what `unet.save_attn_procs` wrote and the UNet's own
`load_lora_adapter(prefix=None)` reads), text encoder paths may leave out `text_model.` (transformers 5
names CLIPTextModel's modules so). The scale is PEFT's: lora_alpha / r from the `LoraConfig` that
diffusers stores in the safetensors metadata (`lora_adapter_metadata`: "unet.lora_alpha", "unet.r",
"unet.alpha_pattern", "unet.rank_pattern", "unet.use_rslora" -> lora_alpha / sqrt(r)); without it 1 (alpha
= rank), as diffusers loads such files; a `<module>.alpha` key, where a file has one, gives alpha / rank.

Two uses:
- training: `inject_lora(model, rank)` attaches trainable adapters by forward hooks (the model's own weights
  and state_dict keys stay untouched); `network.save(path)` writes the kohya file.
- generation: `apply_lora(model, path_or_state, weight)` merges a file into the weights and returns a handle
  whose `unmerge()` restores the original tensors exactly (they are kept, not recomputed). Merging goes
  through `sdlab.adapters.patch`, so it works on `sdlab.perf.optimize`d models (packed weights) too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import families
from .adapters.patch import WeightPatches, read_weight
from .checkpoints.atomic import atomic_write
from .checkpoints.io import quoted_key, read_checkpoint
from .errors import CheckpointError, ParameterError

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"  # the text encoders' prefixes are their family components' (`lora_prefix`)
# Kohya's default targets: every Linear / 1x1 conv inside the UNet's transformers, and the text encoder's
# attention and MLP layers.
UNET_TARGET_PARENT = "attentions"
TEXT_TARGET_PARENTS = ("self_attn", "mlp")

StateDict = dict[str, torch.Tensor]
LoRASource = str | os.PathLike | Mapping[str, torch.Tensor]  # a LoRA file (kohya or diffusers/PEFT), or its tensors


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
    """kohya name -> Linear/Conv2d module, for every such layer of each network of the model's family that
    has a kohya prefix (UNet, text encoders), under its diffusers name and its aliases: the original (LDM)
    name of a UNet module, a text encoder's path without `text_model.`."""
    family = families.family_of(model.config)
    keymaps = None
    names: dict[str, nn.Module] = {}
    for name, component in family.components.items():
        network = getattr(model, name, None) if component.lora_prefix else None
        if network is None:
            continue
        network = getattr(network, "_orig_mod", network)  # a torch.compile'd network runs its layers' weights as they are
        text = name in family.text_encoders
        if not text:
            keymaps = family.keymaps(model.config) if keymaps is None else keymaps
            keymap = keymaps.get(name)
            to_ldm = {diffusers: original for original, diffusers in keymap.pairs} if keymap else {}
        for path, module in network.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                names[kohya_name(component.lora_prefix, path)] = module
                alias = path.removeprefix("text_model.") if text else _ldm_path(path, to_ldm)
                if alias is not None and alias != path:
                    names.setdefault(kohya_name(component.lora_prefix, alias), module)
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
    alpha: float  # the update is scaled by alpha / rank
    label: str = ""  # the module as the file names it, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the update has the layer's output size and its input size (in * kh * kw)."""
        return (self.up.ndim >= 2 and self.up.shape[0] == shape[0] and self.up.flatten(1).shape[1] == self.rank
                and self.down.flatten(1).shape[1] == math.prod(shape[1:]))

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped as the layer's weight (a Linear's (out, in) and a 1x1
        conv's (out, in, 1, 1) are interchangeable: SD 1.x and 2.x differ there)."""
        if not self.fits(tuple(shape)):
            raise CheckpointError(f"a LoRA update of shape {_update_shape(self)} does not fit a weight {tuple(shape)}")
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in * kh * kw)
        return product.reshape(shape) * (self.alpha / self.rank)


def _update_shape(update: LoRAModule) -> tuple[int, int]:
    """(out, in * kh * kw) of an update, for messages."""
    return (update.up.shape[0] if update.up.ndim else 0, update.down.flatten(1).shape[1] if update.down.ndim else 0)


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


# --- reading files: the kohya and the diffusers/PEFT layouts -----------------------------------------------

# The end of a key after its module -> the tensor's role.
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_PARTS = {
    "lora_A.weight": "down", "lora_B.weight": "up",  # PEFT: diffusers >= 0.26, LCM-LoRA, most hub LoRAs
    "lora.down.weight": "down", "lora.up.weight": "up",  # diffusers' own LoRA layers before PEFT
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",  # ...their text encoder's
    "alpha": "alpha",
}  # fmt: skip
# Attention-processor names (diffusers' `save_attn_procs`): `attn1.processor.to_q_lora.down.weight`. The
# UNet's to_out is `to_out.0`; a text encoder's projections are CLIP's q/k/v/out_proj.
_PROCESSOR_NAME = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.")
_UNET_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Component names of diffusers pipelines: a key that starts with one the model's family lacks is for
# another architecture (never read as an unprefixed UNet path).
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior",
                        "decoder", "controlnet")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, JSON, in safetensors metadata
# Parts beside down/up that sdlab leaves out, merging the plain low-rank update and saying so (diffusers
# drops kohya's DoRA scales the same way): DoRA magnitudes, PEFT's lora_bias. Any other part (LoCon's
# lora_mid, LoHa, LoKr) makes the module one sdlab does not read.
IGNORED_PARTS = frozenset({"dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_B.bias"})


@dataclass(frozen=True)
class PeftScale:
    """The fields of a PEFT `LoraConfig` that set a module's scale (their defaults are LoraConfig's):
    lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module r and alpha by pattern (a module path,
    or its last dotted parts; `^` anchors it at the start, as PEFT matches them)."""

    r: int = 8
    lora_alpha: float = 8.0
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False

    def alpha_for(self, path: str, rank: int, where: str) -> float:
        """The alpha that gives this module PEFT's scale as alpha / rank (`rank`: its tensors')."""
        r = _by_pattern(self.rank_pattern, path, self.r)
        if r != rank:
            raise CheckpointError(f"{where}: LoRA module {quoted_key(path)} has rank {rank}, but the file's "
                                  f"{METADATA_KEY} (its LoraConfig) gives rank {r}")
        alpha = _by_pattern(self.alpha_pattern, path, self.lora_alpha)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return scale * rank


def _by_pattern(patterns: tuple[tuple[str, float], ...], path: str, default):
    """PEFT's `get_pattern_key`: the first pattern that is `path` or a dotted tail of it. Patterns are taken
    as literal names (PEFT compiles them as regular expressions; module names have no special characters
    but `.`), so no pattern from a file is ever run as one."""
    for pattern, value in patterns:
        name = pattern.removeprefix("^")
        if path == name or (not pattern.startswith("^") and path.endswith("." + name)):
            return value
    return default


def _peft_scales(metadata: Mapping[str, str], components, where: str) -> dict[str, PeftScale]:
    """The `LoraConfig` diffusers stored for each component ("unet.r", "unet.lora_alpha", ...), by name."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    what = f"{where}: its {METADATA_KEY} metadata (diffusers' LoraConfig by component)"
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{what} is not valid JSON") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    scales = {}
    for name in components:
        fields = {k[len(name) + 1 :]: v for k, v in info.items() if k.startswith(name + ".")}
        if fields:
            scales[name] = _peft_scale(fields, f"{what}, field {name}.")
    return scales


def _peft_scale(fields: Mapping[str, object], what: str) -> PeftScale:
    def number(key, value, kind):
        ok = (isinstance(value, int) and value >= 1) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value):
            raise CheckpointError(f"{what}{key} is not {'a positive integer' if kind is int else 'a number'}")
        return kind(value)

    def pattern(key, kind):
        value = fields.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{what}{key} is not an object of module name -> {kind.__name__}")
        return tuple((str(k), number(key, v, kind)) for k, v in value.items())

    rslora = fields.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{what}use_rslora is not true or false")
    return PeftScale(r=number("r", fields.get("r", 8), int), lora_alpha=number("lora_alpha", fields.get("lora_alpha", 8), float),
                     rank_pattern=pattern("rank_pattern", int), alpha_pattern=pattern("alpha_pattern", float),
                     use_rslora=rslora)


@dataclass
class _Entry:
    """One module's tensors as a file gives them, gathered from its keys."""

    label: str  # the module as the file names it
    component: str | None  # diffusers layout: the component's name (None: kohya layout)
    path: str  # diffusers layout: the module's path in its component
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # "down", "up", "alpha"
    other: set[str] = field(default_factory=set)  # key endings that are no plain LoRA (DoRA, biases, ...)


def _parse_key(key: str, family) -> tuple[str, str, str | None, str, str | None]:
    """A key -> (module name: kohya name, or the dotted name of a module the family has no network for;
    its label; the component (diffusers layout); the module path; its role, None for other parts)."""
    first, _, rest = key.partition(".")
    if first.startswith("lora_"):  # kohya: one name, then the part
        return first, first, None, "", KOHYA_PARTS.get(rest) or rest
    components = {n: c for n, c in family.components.items() if c.lora_prefix}
    known = {*DIFFUSERS_COMPONENTS, *(n for f in families.FAMILIES.values() for n in f.components)}
    if first in components or first in known:
        component, body = first, rest
    else:  # no component name: the UNet's keys, as `save_attn_procs` wrote them
        denoisers = [n for n in components if n not in family.text_encoders]
        component, body = (denoisers[0] if len(denoisers) == 1 else ""), key
    text = component in family.text_encoders or component.startswith("text_encoder")
    names = _TEXT_PROCESSOR if text else _UNET_PROCESSOR
    body = _PROCESSOR_NAME.sub(lambda m: f".{names[m.group(1)]}.lora.", body.replace(".processor.", "."))
    for ending, role in DIFFUSERS_PARTS.items():
        if body.endswith("." + ending):
            path, part = body[: -len(ending) - 1], role
            break
    else:
        cut = body.find(".lora")
        path, part = (body[:cut], body[cut + 1 :]) if cut > 0 else (body, body)
    label = f"{first}.{path}" if component == first else path
    if component in components:
        return kohya_name(components[component].lora_prefix, path), label, component, path, part
    return label, label, component, path, part  # a dotted name: it matches no layer and is reported skipped


def _read_entries(state: Mapping[str, torch.Tensor], family, where: str) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for key, value in state.items():
        name, label, component, path, part = _parse_key(key, family)
        entry = entries.setdefault(name, _Entry(label, component, path))
        if part not in ("down", "up", "alpha"):
            entry.other.add(part)
        elif part in entry.parts:
            raise CheckpointError(f"{where}: the LoRA module {quoted_key(label)} is given twice (as "
                                  f"{quoted_key(entry.label)} too: the file mixes layouts)")
        else:
            entry.parts[part] = value
    return entries


def read_lora(source: LoRASource, family: families.Family | None = None) -> dict[str, LoRAModule]:
    """A LoRA (file path or state dict), kohya or diffusers/PEFT layout -> kohya module name -> LoRAModule.

    `family` (default SD 1.x) names the components that diffusers-layout keys start with and gives their
    kohya prefixes (`apply_lora` passes the model's)."""
    family = family or families.get_family("sd1")
    where = str(source) if isinstance(source, (str, os.PathLike)) else "LoRA state dict"
    if isinstance(source, (str, os.PathLike)):
        raw = read_checkpoint(source)
        state, metadata = raw.tensors, raw.metadata
    else:
        state, metadata = dict(source), {}
    scales = _peft_scales(metadata, family.components, where)
    modules, unsupported, extras = {}, [], {}
    for name, entry in _read_entries(state, family, where).items():
        if "down" not in entry.parts or "up" not in entry.parts or entry.other - IGNORED_PARTS:
            unsupported.append(quoted_key(entry.label))
            continue
        down, up = entry.parts["down"], entry.parts["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4):
            raise CheckpointError(f"{where}: LoRA module {quoted_key(entry.label)}: its down/up tensors have "
                                  f"{down.ndim}/{up.ndim} dimensions, not 2 (Linear) or 4 (convolution)")
        rank = down.shape[0]
        if "alpha" in entry.parts:
            alpha = entry.parts["alpha"]
            if alpha.numel() != 1 or not math.isfinite(float(alpha.flatten()[0])):
                raise CheckpointError(f"{where}: LoRA module {quoted_key(entry.label)}: its alpha is not one "
                                      f"finite number")
            alpha = float(alpha.flatten()[0])
        elif entry.component in scales:
            alpha = scales[entry.component].alpha_for(entry.path, rank, where)
        else:  # kohya: alpha = rank when absent; diffusers/PEFT without a LoraConfig: scale 1, the same
            alpha = float(rank)
        modules[name] = LoRAModule(down, up, alpha, entry.label)
        for part in entry.other:
            extras.setdefault(part, []).append(entry.label)
    if unsupported:
        log.warning("%s: %d entries are not plain LoRA (lora_down/lora_up, lora_A/lora_B: LoCon's lora_mid, LoHa, "
                    "LoKr are not read) and are ignored, e.g. %s",
                    where, len(unsupported), ", ".join(unsupported[:3]))
    for part, labels in extras.items():
        log.warning("%s: %d LoRA modules also have %s tensors, which sdlab does not apply (it merges their "
                    "plain low-rank update only; DoRA magnitudes, LoRA biases), e.g. %s", where, len(labels),
                    quoted_key(part), quoted_key(labels[0]))
    if not modules:
        raise CheckpointError(f"{where}: no kohya-format LoRA weights (keys like "
                              f"'lora_unet_..._to_q.lora_down.weight' / '.lora_up.weight' / '.alpha') and no "
                              f"diffusers/PEFT ones ('unet...to_q.lora_A.weight' / '.lora_B.weight') found")
    return modules


# --- generation: merging a file into the weights ----------------------------------------------------------


@torch.no_grad()
def apply_lora(model, source: LoRASource, weight: float = 1.0) -> MergedLoRA:
    """Merge a LoRA into `model` (an `sdlab.Model`): W += weight * alpha / rank * up @ down for each layer.

    Returns a `MergedLoRA` whose `unmerge()` restores the weights exactly. Entries naming no layer of this
    model (e.g. an SDXL LoRA's second text encoder on SD 1.x) are skipped with a warning; if none applies,
    or any names a layer of another shape (a LoRA for another architecture), raises `CheckpointError`
    before changing anything.
    """
    if model.residency is not None:
        raise ParameterError(
            "LoRAs cannot be used with a low-memory model (loaded with low_memory=True / --low-memory): they are "
            "merged into the weights in memory, which that mode sends back to the file between stages; load the "
            "model without it to use LoRAs")
    family = families.family_of(model.config)
    lora = read_lora(source, family)
    layers = adaptable_modules(model)
    handle = MergedLoRA()
    misfits = []
    for name, update in lora.items():
        layer = layers.get(name)
        if layer is None:
            handle.skipped.append(name)
        elif not update.fits(_weight_shape(layer)):
            misfits.append((update, _weight_shape(layer)))
    if misfits:
        raise CheckpointError(_misfit_message(source, model, lora, misfits))
    try:
        for name, update in lora.items():
            if name in layers:
                _merge_into(layers[name], update, weight, handle, name)
                handle.applied.append(name)
    except BaseException:  # a bad module half-way: leave the model as it was
        handle.unmerge()
        raise
    _report(source, handle, model, lora)
    return handle


def _weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """A Linear's (out, in) or a Conv2d's (out, in / groups, kh, kw), without unpacking a packed layer."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)


def _merge_into(layer: nn.Module, update: LoRAModule, weight: float, handle: MergedLoRA, name: str) -> None:
    current = read_weight(layer)  # (out, in[, kh, kw]); a packed layer's is an unpacked copy
    try:
        delta = update.delta(current.shape)
    except CheckpointError as e:
        raise CheckpointError(f"LoRA module {name}: {e}") from None
    # in float32, rounded once to the layer's dtype (bf16/fp16 weights would lose the small update otherwise)
    handle.patches.replace(layer, (current.float() + weight * delta.to(current.device)).to(current.dtype))


def _model_label(model) -> str:
    return f"{model.config.name!r}, {families.family_of(model.config).label}"


def _misfit_message(source, model, lora: Mapping[str, LoRAModule], misfits) -> str:
    """Why a LoRA does not fit: which of its modules, which architecture it is for, and, from its
    cross-attention layers' text width, how that differs from the model."""
    where = str(source) if isinstance(source, (str, os.PathLike)) else "LoRA state dict"
    update, shape = misfits[0]
    width = _context_width(lora)
    message = (f"{where}: this LoRA is not for this model{_intended(lora, model, width)}. {len(misfits)} of its "
               f"{len(lora)} modules have other shapes than the layers they name (e.g. {quoted_key(update.label)}: "
               f"an update of {_update_shape(update)} for a weight of {shape}), so its keys and shapes are for "
               f"another architecture")
    context = getattr(model.config.unet, "context_dim", None)
    if width is not None and context is not None and width != context:
        message += f" (its cross-attention layers read a {width}-wide text context; this model's, {context})"
    return f"{message}. This model is {_model_label(model)}."


def _context_width(lora: Mapping[str, LoRAModule]) -> int | None:
    """The text width the LoRA's cross-attention key/value layers read (their `in`), if they agree on one."""
    widths = {u.down.flatten(1).shape[1] for n, u in lora.items() if n.endswith(("attn2_to_k", "attn2_to_v"))}
    return widths.pop() if len(widths) == 1 else None


def _intended(lora: Mapping[str, LoRAModule], model, width: int | None) -> str:
    """": it is for SD 1.x (...) models", from the families whose networks are all the ones the LoRA's keys
    name (as the file names them: kohya prefixes such as `lora_te1_`, or diffusers component names such as
    `text_encoder_2`), narrowed to those with a preset of the LoRA's context width; "" when no family but
    the model's own fits (the LoRA is then for a variant sdlab cannot tell apart)."""
    candidates = [f for f in families.FAMILIES.values() if all(_names_network_of(f, u.label) for u in lora.values())]
    by_width = [f for f in candidates if any(p.unet.context_dim == width for p in f.presets)]
    candidates = by_width or candidates
    if not candidates or families.family_of(model.config) in candidates:
        return ""
    return f": it is for {' or '.join(f.label for f in candidates)} models"


def _names_network_of(family: families.Family, label: str) -> bool:
    """Whether a module name from a file (kohya `lora_te1_...`, diffusers `text_encoder_2.<path>`, or an
    unprefixed UNet path) is for a network this family has (a name in no known layout: True)."""
    adaptable = {n: c for n, c in family.components.items() if c.lora_prefix}
    first = label.partition(".")[0]
    if first.startswith("lora_"):
        prefixes = {c.lora_prefix for f in families.FAMILIES.values() for c in f.components.values() if c.lora_prefix}
        if not any(first.startswith(p) for p in prefixes):
            return True
        return any(first.startswith(c.lora_prefix) for c in adaptable.values())
    known = {*DIFFUSERS_COMPONENTS, *(n for f in families.FAMILIES.values() for n in f.components)}
    return first in adaptable if first in known else True  # unprefixed keys are the UNet's, which all have


def _report(source, handle: MergedLoRA, model, lora: Mapping[str, LoRAModule]) -> None:
    where = str(source) if isinstance(source, (str, os.PathLike)) else "LoRA state dict"
    examples = ", ".join(quoted_key(lora[name].label) for name in handle.skipped[:3])
    if handle.skipped and handle.applied:
        log.warning("%s: %d LoRA modules match no layer of this model and are ignored, e.g. %s",
                    where, len(handle.skipped), examples)
    if not handle.applied:
        handle.unmerge()
        intended = _intended(lora, model, _context_width(lora))
        raise CheckpointError(
            f"{where}: none of its {len(handle.skipped)} LoRA modules matches a layer of this model "
            f"(e.g. {examples}){intended or '; is it for another architecture (SDXL, SD 2.x vs 1.x)?'}. "
            f"This model is {_model_label(model)}."
        )
    log.info("%s: merged %d LoRA modules", where, len(handle.applied))
