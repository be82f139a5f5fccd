"""A Stable Diffusion model: its networks by name, the tokenizer and the config that ties them together.

Which networks a model has is its family's choice (`sdlab.families`: unet, vae and text_encoder for SD
1.x/2.x; SDXL adds text_encoder_2); they sit in `model.components` and read as attributes (`model.unet`).

`Model.load(path)` reads a diffusers folder or a single `.safetensors`/`.ckpt` file; `Model.build(config)`
makes one with random weights; `model.save(path, layout=...)` writes either layout. Loading builds the
networks on the meta device and *assigns* the checkpoint's tensors (memory-mapped for safetensors), so the
weights are never held twice. `Model.load(path, low_memory=True)` keeps only the running stage's networks in
memory (`sdlab.residency`); `model.using(*names)` marks a stage.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoints, families
from .checkpoints.io import quoted_key
from .config import PRESETS, ModelConfig
from .errors import CheckpointError, ParameterError
from .perf import check_quantization, convert_dtype, optimize, quantize_int8, unpack
from .residency import Residency, check_memory_mapped
from .tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)


@dataclass
class Model:
    """The networks of one Stable Diffusion checkpoint. Plain container: no sampling logic lives here.

    `components` holds the networks by the names the family declares; `model.unet`, `model.vae`,
    `model.text_encoder` (and any other component) read and replace them as attributes. `tokenizers` holds
    each text encoder's tokenizer by its folder name ("tokenizer", SDXL's "tokenizer_2"); `model.tokenizer`
    is the first text encoder's.
    """

    config: ModelConfig
    tokenizers: dict[str, CLIPTokenizer]
    components: dict[str, nn.Module]
    source: Path | None = None  # the file or folder it was loaded from
    # Opt-in: decode with a tiny VAE decoder (TAESD, `sdlab.nn.tiny_vae.load_tiny_decoder`) instead of `vae`.
    tiny_decoder: nn.Module | None = None
    residency: Residency | None = None  # low-memory mode: which networks are in memory (None: all, always)

    def __getattr__(self, name: str) -> nn.Module:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or component {name!r}")

    def __setattr__(self, name: str, value) -> None:
        components = self.__dict__.get("components", {})
        if name in components:  # e.g. perf's compiled UNet replacing model.unet
            components[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return next(iter(self.tokenizers.values()))

    @classmethod
    def build(cls, config: ModelConfig, *, device="cpu", dtype=torch.float32) -> Model:
        """A model with freshly initialised (random) weights."""
        with torch.device(device):
            nets = _networks(config)
        model = cls(config, _tokenizers(config, {}), nets)
        return model.to(dtype=dtype)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        family: str | None = None,
        prediction: str | None = None,
        variant: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        low_memory: bool = False,
        plain: bool = False,
        quantize: str | None = None,
    ) -> Model:
        """Load a diffusers folder or a single-file checkpoint.

        `family` overrides detection (a preset name such as "sd15", "sd21"); `prediction` overrides
        "epsilon"/"v_prediction" (SD 2.x 768 single files cannot say which they are). `dtype` is the compute
        dtype: fp16 files are converted to fp32 by default, which a CPU needs for speed. `low_memory` holds
        only the running stage's networks in memory, the others in the memory-mapped file
        (`sdlab.residency`): the peak is the UNet's instead of all networks', at the cost of converting
        (and packing) each network again at every generation (SDXL: ~15 s); LoRAs cannot be merged into it.

        The model comes on the fast inference path (`sdlab.perf.optimize` without a dtype change: on a CPU
        the UNet's and VAE's weights are packed for oneDNN at their first call; fp32 images stay within
        float rounding of the reference). `plain=True` leaves the networks exactly as the checkpoint built
        them: bit-compatible with diffusers' eager kernels, and what training needs (packed layers hold no
        weight parameter to train). `quantize="int8"` computes the UNet's convolutions and linear layers in
        int8 (`sdlab.perf.quantize_int8`): with dtype=torch.bfloat16, the fastest and smallest mode on a CPU,
        at a small cost in fidelity (docs/performance.md).
        """
        check_quantization(quantize)
        ckpt = checkpoints.load_checkpoint(path, family=family, prediction=prediction, variant=variant)
        nets = _meta_networks(ckpt)
        check_weights_fit(nets, ckpt)
        residency = None
        if low_memory:  # the networks point at the file's tensors; a stage converts its own (Model.using)
            homes = {name: ckpt.weights[name] for name in nets}
            check_memory_mapped(homes, ckpt.source)
            for name, net in nets.items():
                _assign(net, homes[name], None, "cpu", where=f"{ckpt.source} ({name})")
            residency = Residency(homes, dtype, device)
        else:
            for name, net in nets.items():
                # An int8 UNet's layers keep the file's weights until their first call, where each converts
                # and quantizes its own: the UNet is never held whole in `dtype` on its way to int8.
                deferred = quantize is not None and not plain and name == "unet"
                _assign(net, ckpt.weights[name], None if deferred else dtype, device, where=f"{ckpt.source} ({name})")
                if deferred:
                    convert_dtype(quantize_int8(net), dtype, pack=True)
        model = cls(ckpt.config, _tokenizers(ckpt.config, ckpt.tokenizer_dirs), nets, source=Path(ckpt.source),
                    residency=residency)
        return _inference_path(model, plain, quantize)

    @classmethod
    def from_name(cls, name: str | Path | None = None, **load_options) -> Model:
        """Resolve what users type for `--model`: None or "builtin" = the model shipped with sdlab;
        "random:<preset>" = random weights of a preset (e.g. "random:sd15", for smoke tests and benchmarks);
        anything else is a path (diffusers folder or single file). Options as `load`'s (random weights: device,
        dtype, plain and quantize)."""
        if name is None or str(name) == "builtin":
            return cls.load(builtin_model_path(), **load_options)
        if str(name).startswith("random:"):
            preset = str(name).removeprefix("random:")
            if preset not in PRESETS:
                raise CheckpointError(f"unknown preset {preset!r} in {name!r}; valid: {', '.join(PRESETS)}")
            if load_options.get("low_memory"):
                log.warning("%s has no file to keep its weights in: low-memory mode does nothing for it", name)
            with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
                torch.manual_seed(0)
                model = cls.build(PRESETS[preset], device=load_options.get("device", "cpu"),
                                  dtype=load_options.get("dtype", torch.float32))
            return _inference_path(model, load_options.get("plain", False), load_options.get("quantize"))
        return cls.load(name, **load_options)

    def save(self, path: str | Path, *, layout: str = "diffusers", dtype: torch.dtype | None = None,
             overwrite: bool = False) -> Path:
        """Write the model as a diffusers folder (`layout="diffusers"`) or one `.safetensors` file
        (`layout="single-file"`), optionally converting to `dtype` (e.g. torch.float16). Atomic, and refuses
        to replace an existing path unless `overwrite=True`."""
        weights = {name: net.state_dict() for name, net in self.components.items()}
        if layout == "diffusers":
            return checkpoints.save_diffusers(path, self.config, weights, dtype=dtype, overwrite=overwrite)
        if layout == "single-file":
            return checkpoints.save_single_file(path, self.config, weights, dtype=dtype, overwrite=overwrite)
        raise ValueError(f"unknown layout {layout!r}: use 'diffusers' or 'single-file'")

    def using(self, *names: str):
        """A context in which the networks `names` are in memory: a no-op unless the model was loaded with
        `low_memory=True`, where it sends the others home first (see `sdlab.residency`). Generation marks
        its stages with it: the text encoders, the UNet, the VAE."""
        if self.residency is None:
            return nullcontext()
        return self.residency.using(self.components, names)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The components that encode the prompt: "text_encoder" (and SDXL's "text_encoder_2"), as the
        family declares them."""
        return tuple(name for name, c in families.family_of(self.config).components.items() if c.tokenizer)

    def to(self, device=None, dtype=None) -> Model:
        if self.residency is not None:  # later stages bring their networks in with the new dtype/device
            self.residency.reset(self.components, dtype, device)
        else:
            leaving_cpu = device is not None and torch.device(device).type != "cpu"
            for net in self.components.values():
                if leaving_cpu:
                    unpack(net)  # oneDNN-packed weights are CPU-only
                net.to(device=device, dtype=dtype)
        if self.tiny_decoder is not None:
            self.tiny_decoder.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.residency.device if self.residency is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.residency.dtype if self.residency is not None else next(self.unet.parameters()).dtype


def _inference_path(model: Model, plain: bool, quantize: str | None) -> Model:
    if plain:
        if quantize is not None:
            raise ParameterError(f"quantize={quantize!r} needs the fast inference path; it cannot go with plain=True")
        return model
    return optimize(model, quantize=quantize)


def builtin_model_path() -> Path:
    """The folder of the small model trained on the shapes world that ships with sdlab."""
    path = Path(__file__).parent / "data" / "builtin"
    if not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"the built-in model is not in this installation ({path}); pass a model path, or "
            "'random:tiny' for random weights")
    return path


def _networks(config: ModelConfig) -> dict[str, nn.Module]:
    """The family's networks for `config`, in its declared order (random weights depend on it), frozen."""
    nets = {name: c.build(config) for name, c in families.family_of(config).components.items()}
    for net in nets.values():
        net.eval().requires_grad_(False)
    return nets


def check_checkpoint(ckpt: checkpoints.LoadedCheckpoint) -> None:
    """Raise `CheckpointError` unless every weight of `ckpt` fits the networks its config describes: the same
    keys, shapes and kinds of dtype that `Model.load` needs. The networks are built on the meta device and no
    tensor data is read, so this is cheap even for memory-mapped multi-GB files (`sdlab info` uses it)."""
    check_weights_fit(_meta_networks(ckpt), ckpt)


def check_weights_fit(nets: dict[str, nn.Module], ckpt: checkpoints.LoadedCheckpoint) -> None:
    missing = sorted(set(nets) - set(ckpt.weights))
    if missing:
        raise CheckpointError(f"{ckpt.source}: no weights for the components {missing}")
    for name, net in nets.items():
        check_network_weights(net, ckpt.weights[name], where=f"{ckpt.source} ({name})")


def _meta_networks(ckpt: checkpoints.LoadedCheckpoint) -> dict[str, nn.Module]:
    try:
        with torch.device("meta"):
            return _networks(ckpt.config)
    except ParameterError as e:  # a config that passed its own checks but not a network's
        raise CheckpointError(f"{ckpt.source}: its config describes networks sdlab cannot build: {e}") from e


def check_network_weights(net: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """The names, shapes and dtype kinds of `state` against `net`'s own (meta) state dict."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the weights do not fit the {type(net).__name__} architecture: {len(missing)} missing keys "
            f"{_names(missing)}, {len(unexpected)} unexpected keys {_names(unexpected)}"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        examples = "; ".join(f"{quoted_key(k)}: {got}, expected {want}" for k, got, want in wrong[:3])
        raise CheckpointError(f"{where}: {len(wrong)} tensors have the wrong shape, e.g. {examples}")
    # An integer or boolean tensor where the network has floating-point weights would stay one (only floating
    # tensors are converted to the compute dtype) and fail at the first step.
    not_float = [k for k, v in state.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        key = not_float[0]
        raise CheckpointError(
            f"{where}: {len(not_float)} tensors are not floating-point where the network's are, e.g. "
            f"{quoted_key(key)} ({str(state[key].dtype).removeprefix('torch.')})"
        )


def _names(keys: list[str], shown: int = 5) -> str:
    return "[" + ", ".join(quoted_key(k) for k in keys[:shown]) + (", ..." if len(keys) > shown else "") + "]"


def _tokenizers(config: ModelConfig, folders: dict[str, Path]) -> dict[str, CLIPTokenizer]:
    """The tokenizer of each of the family's text encoders, by its folder name: read from `folders` where
    the checkpoint has one, else CLIP's own vocabulary with the text encoder's padding and length."""
    tokenizers = {}
    for name, component in families.family_of(config).components.items():
        if component.tokenizer in folders:
            tokenizers[component.tokenizer] = CLIPTokenizer.from_folder(folders[component.tokenizer])
        elif component.tokenizer:
            text = config.network(name)
            tokenizers[component.tokenizer] = CLIPTokenizer.default(pad_token_id=text.pad_token_id,
                                                                    max_length=text.max_length)
    return tokenizers


def _assign(net: nn.Module, state: dict[str, torch.Tensor], dtype, device, *, where: str) -> None:
    """Load `state` into a meta-device `net` by assignment (no copy unless dtype/device change); `state` has
    been checked to fit (`check_weights_fit`)."""
    # Assign the (memory-mapped) tensors as they are, then convert one tensor at a time, releasing each
    # source's pages: converting the whole dict first would hold the fp32 file and its copy at once (perf edit).
    net.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        convert_dtype(net, dtype)
    net.to(device=device)
    leftover = [name for name, b in net.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"{where}: buffers not initialised by the checkpoint: {leftover}")
