"""Inference speed-ups for a loaded `Model`: `optimize(model)`, which `sdlab.load` applies by default,
`optimize(model, dtype=torch.bfloat16)` and `optimize(model, quantize="int8")`.

Without a dtype change the levers keep the numbers: fp32 images stay within float rounding of the reference
(~1e-5 on the networks' outputs), so loading uses them unless asked for the plain path
(`sdlab.load(path, plain=True)`). Each lever is one small function, so that `benchmarks/levers.py` can
switch them one at a time and docs/performance.md reports what each is worth on this machine:

- `convert_dtype`: weights to bf16/fp16, one tensor at a time, so that peak memory is the converted model
  plus one tensor (converting a whole memory-mapped fp32 state dict at once holds both copies);
- `to_channels_last`: NHWC activations for the convolutions (oneDNN's native layout; the transformers'
  NCHW <-> token permutes become free views); implied by `prepack`;
- `prepack`: conv and linear weights reordered once into oneDNN's blocked layout, instead of at every call
  as torch's eager ops do. That per-call reorder dominates the deep, small-spatial layers (a 1280-channel
  3x3 conv at 8x8 runs 2x faster packed, at 4x4 4x), and oneDNN's matmul measured 15-50% faster than
  torch's default fp32 linear (MKL) on the AMD CPUs here. Convolutions stay bit-identical; state_dict()
  unpacks the weights, so saving still works;
- `upcast_attention`: attention in fp32 under fp16 weights (fp16 overflows; CPUs have no fast fp16 kernels
  anyway). Not for bf16, which has fp32's range: torch's CPU flash-attention kernel accumulates bf16 in fp32
  already, and an upcast measured no more accurate once the output is rounded back to bf16 (the built-in
  model's images: the same distance from fp32 with and without it), while in SDXL's profile it took
  attention from 9% to 17% of a UNet step (`benchmarks/attention_upcast.py`);
- `quantize_int8` (opt-in, `sdlab.load(path, quantize="int8")`): the UNet's convolutions and linear layers
  in int8 on oneDNN's VNNI kernels (`Int8Conv2d`, `Int8Linear`: packed layers too): ~1.3x bf16's UNet
  step and 1 byte a weight, images a little further from fp32's than bf16's (docs/performance.md);
- `compile_unet`: torch.compile (inductor) of the UNet. Works offline (it needs a C++ compiler), but costs
  minutes of compilation on a small CPU; off by default.

Changing the dtype changes the numbers (bf16 images differ from fp32 by a few 8-bit levels), and so does
int8 (~twice bf16's difference; tests/test_int8.py); the other levers keep fp32 results within float rounding
of the default path (tests/test_perf.py).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParameterError
from .nn.layers import Attention

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PACKABLE = (torch.float32, torch.bfloat16)  # what oneDNN computes on any AVX-512 CPU


def optimize(model, dtype: torch.dtype | None = None, *, quantize: str | None = None, channels_last: bool = True,
             prepack_weights: bool = True, attention_upcast: bool | None = None, compile: bool = False):
    """Apply the inference levers to `model` in place and return it.

    dtype: convert the weights (None keeps them; torch.bfloat16 is ~2x faster on CPUs with AVX-512 BF16).
    attention_upcast: None = on for fp16 CPU models (see the module's docstring: not for bf16); True also
    for bf16; False leaves each attention as its config says (never turns off the upcast SD 2.1 needs).
    compile: torch.compile the UNet instead of packing its weights (inductor packs them itself).
    quantize: "int8" computes the UNet's convolutions and linear layers in int8 (`quantize_int8`; CPU, fp32 or
    bf16 weights; the fastest mode with bf16).
    """
    check_quantization(quantize)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ParameterError(f"optimize: dtype must be one of {_DTYPES}, got {dtype}")
        if model.residency is not None:  # low-memory mode: each stage converts its own networks when it runs
            model.to(dtype=dtype)
        else:
            for net in model.components.values():
                convert_dtype(net, dtype)
    on_cpu = model.device.type == "cpu"
    packing = prepack_weights and on_cpu and model.dtype in _PACKABLE and torch.backends.mkldnn.is_available()
    for net in (model.unet, model.vae):
        if packing and not (compile and net is model.unet):
            prepack(net)  # packed convolutions take and give channels_last activations by themselves
        elif channels_last and model.residency is None:  # (a low-memory model's stages would undo it)
            to_channels_last(net)
    if attention_upcast is None:
        attention_upcast = on_cpu and model.dtype == torch.float16
    if attention_upcast:  # never switched off here: SD 2.1 needs it in fp16
        upcast_attention(model.unet)
        upcast_attention(model.vae)
    if quantize is not None:
        if not packing or compile:
            raise ParameterError(f"quantize={quantize!r} needs oneDNN's CPU kernels on fp32 or bf16 weights with "
                                 f"packing on and compile off; this model is on {model.device}, {model.dtype}")
        quantize_int8(model.unet)
    if compile:
        model.unet = compile_unet(model.unet)
    log.debug("optimize: dtype %s, packed weights %s, attention upcast %s, compiled %s, quantized %s",
              model.dtype, packing, attention_upcast, compile, quantize)
    return model


def convert_dtype(module: nn.Module, dtype: torch.dtype, *, pack: bool = False) -> nn.Module:
    """Cast floating-point parameters and buffers to `dtype` one tensor at a time, dropping each source
    tensor (often a memory-mapped checkpoint page range) before converting the next. `pack`: packed layers
    convert as they pack (`_PackedWeight.convert_for_packing`), so no plain converted copy of theirs adds up."""
    for sub in module.modules():
        if isinstance(sub, _PackedWeight):
            if pack:
                sub.convert_for_packing(dtype)
                continue
            if sub.packed is not None and sub._dtype() != dtype:
                sub.set_weight(sub.weight)  # plain again: converted below, packed at the next call
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                converted = tensor.detach().to(dtype)
                table[name] = nn.Parameter(converted, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                    else converted
                release_pages(tensor)
    return module


_MADV_DONTNEED, _MADV_PAGEOUT = 4, 21  # Linux; PAGEOUT since 5.4
_PAGEMAP_PRESENT, _PAGEMAP_SWAPPED, _PAGEMAP_FILE = 1 << 63, 1 << 62, 1 << 61


def release_pages(tensor: torch.Tensor) -> None:
    """Take a memory-mapped checkpoint tensor that was just replaced out of this process's resident memory.

    Loading memory-maps the weight files: a tensor's pages become resident when first read, and stay so
    while any tensor of the same file is alive (one mapping per file). Converting or packing the weights one
    by one would thus hold the whole file plus the new copy. If every resident page of the tensor is still
    the file's own (unmodified), MADV_DONTNEED unmaps them, leaving them in the page cache for the next
    load; otherwise MADV_PAGEOUT, which never loses data (modified pages can only be swapped out). A no-op
    for tensors outside file mappings and on systems without madvise.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()  # contiguous checkpoint tensors
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, (start + size) // page * page  # whole pages inside the tensor
    if last <= first or not in_file_mapping(start):
        return
    advice = _MADV_DONTNEED if _unmodified_file_pages(first, last, page) else _MADV_PAGEOUT
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)


def _unmodified_file_pages(first: int, last: int, page: int) -> bool:
    """Whether no page in [first, last) was copied on write (per /proc/self/pagemap: a page of a private
    file mapping that was written to turns anonymous, and may since have been swapped out)."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            entries = np.frombuffer(pagemap.read((last - first) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    present = (entries & np.uint64(_PAGEMAP_PRESENT)) != 0
    swapped = (entries & np.uint64(_PAGEMAP_SWAPPED)) != 0
    file_page = (entries & np.uint64(_PAGEMAP_FILE)) != 0
    return bool(np.all(np.where(present, file_page, ~swapped)))


def in_file_mapping(address: int) -> bool:
    """Whether `address` lies in a mapping of a regular file (per /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= address < high:
                return len(fields) >= 6 and fields[5].startswith("/")
    return False


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def to_channels_last(module: nn.Module) -> nn.Module:
    """NHWC weights for every conv; oneDNN then keeps activations NHWC from the first conv on."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            weight = sub.weight.data
            sub.weight.data = weight.contiguous(memory_format=torch.channels_last)
            release_pages(weight)
    return module


class _PackedWeight:
    """Mixin for a Conv2d/Linear whose weight is held only in oneDNN's blocked layout, reordered once (at the
    first inference call, for its input shape) instead of at every call, as torch's eager ops do.

    The plain weight is dropped after packing, so memory does not double; `.weight` and `state_dict()` unpack
    it on demand, bit for bit (`.weight` is then a temporary: writing into it changes nothing). `set_weight`
    replaces the weight (LoRA merges go through it, via `sdlab.adapters.patch`): the layer holds the plain
    weight again and packs it at its next inference call. With gradients enabled, on another device or
    dtype, it falls back to the plain op. Inference only: convert the dtype before packing (`unpack` undoes it).
    """

    packed: torch.Tensor | None = None  # an mkldnn tensor
    packed_for: tuple[int, ...] | None = None  # the input shape it was last packed for (oneDNN's layout hint)
    # Set by `convert_for_packing`: the plain weight is still in the checkpoint's dtype, and packing converts it.
    pack_dtype: torch.dtype | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self.packed is not None:
            return self._unpacked()
        weight = self._parameters["weight"]
        return weight if self.pack_dtype is None else weight.to(self.pack_dtype)

    def _fast(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled():
            if self.packed is not None:
                _warn_once("a layer packed for inference ran with gradients on: its weight is not a parameter, "
                           "so it gets no gradient. To train, load with sdlab.load(path, plain=True) (or call "
                           "sdlab.perf.unpack on the network before making the optimizer)")
            return False
        return x.device.type == "cpu" and x.dtype == self._dtype()

    def _dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its input's, its output's and its bias'."""
        if self.packed is not None:
            return self.packed.dtype
        return self.pack_dtype or self._parameters["weight"].dtype

    def _unpacked(self) -> torch.Tensor:
        return self.packed.to_dense()

    def _pack_from(self, x: torch.Tensor) -> None:
        self._pack(tuple(x.shape))

    def _pack(self, input_shape: tuple[int, ...]) -> None:
        source = self._parameters.pop("weight").detach()
        weight = source if self.pack_dtype is None else source.to(self.pack_dtype)
        self.packed, self.packed_for, self.pack_dtype = self._reorder(weight, list(input_shape)), input_shape, None
        release_pages(source)

    def convert_for_packing(self, dtype: torch.dtype) -> None:
        """Get the layer to compute in `dtype` without ever holding its converted plain weight beside the
        others': a layer packed before packs again now, for the input shape it had; one never packed keeps the
        weight as it is until its first call, which converts while packing (low-memory mode brings whole
        networks in this way, `sdlab.residency`). The bias is converted now."""
        if self.bias is not None and self.bias.dtype != dtype:
            self.bias = nn.Parameter(self.bias.detach().to(dtype), self.bias.requires_grad)
        if self.packed is not None and self._dtype() == dtype:
            return
        if self.packed is not None:
            self.set_weight(self.weight)
        self.pack_dtype = None if self._parameters["weight"].dtype == dtype else dtype
        if self.packed_for is not None and dtype in _PACKABLE:
            self._pack(self.packed_for)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Hold `weight` (out, in[, kh, kw], this layer's dtype) as the plain weight, dropping any pack; the
        next inference call packs it again. The tensor is taken, not copied."""
        self.packed = self.pack_dtype = None
        old = self._parameters.pop("weight", None)  # None if packed
        others = dict(self._parameters)  # the weight goes first, as in a plain layer: state_dict() key order
        self._parameters.clear()
        self._parameters["weight"] = nn.Parameter(weight.detach(), requires_grad=old is not None and old.requires_grad)
        self._parameters.update(others)

    def unpack(self) -> None:
        if self.packed is not None or self.pack_dtype is not None:
            self.set_weight(self.weight)
        self.__class__ = self._plain

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.packed is not None:  # first, to keep the plain layer's key order
            destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.pack_dtype is not None:  # the plain weight is still the file's: give it in the layer's dtype
            destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, *args, **kwargs):
        if self.packed is not None:  # load into a plain weight; the next call packs it again
            self.set_weight(self.weight)
        super()._load_from_state_dict(*args, **kwargs)


class PackedConv2d(_PackedWeight, nn.Conv2d):
    """nn.Conv2d with a prepacked oneDNN weight; channels_last activations in and out."""

    _plain = nn.Conv2d

    def _reorder(self, weight: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
            input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x) or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return self._conv_forward(x, self.weight, self.bias)
        if self.packed is None:
            self._pack_from(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")


class PackedLinear(_PackedWeight, nn.Linear):
    """nn.Linear computed by oneDNN's matmul on a prepacked weight (MKL's sgemm, which torch uses for fp32,
    does not use AVX-512 on AMD CPUs; oneDNN does)."""

    _plain = nn.Linear

    def _reorder(self, weight: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, math.prod(input_shape[:-1]))  # rows of x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        if self.packed is None:
            self._pack_from(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


ZERO_POINT = 128  # of the uint8 activation codes (see _Int8Weight)


class _Int8Weight(_PackedWeight):
    """Mixin for a packed Conv2d/Linear that computes in int8 with oneDNN's VNNI kernels (`quantize_int8`).

    Weights: symmetric int8 per output channel (scale = max |w| / 127), quantized when the layer packs, so the
    layer holds 1 byte per weight. Activations: uint8 per tensor around a fixed zero point (128), the scale
    from the input's own range at every call (dynamic quantization). A UNet's activation ranges move with the
    timestep and the prompt, so a range calibrated once would clip some steps and waste levels at others;
    measuring it is one read of the input (`torch.aminmax`), a few % of the layer's time. The output comes
    back in the input's dtype, and `.weight` / `state_dict()` give the dequantized weight (what the layer
    computes with).
    """

    # One zero point for every activation: oneDNN folds it into a packed conv weight (a compensation term);
    # a zero point that changed from call to call would make it reorder the weight at every call (measured:
    # 8.8 ms for a 1280-channel 3x3 conv at 8x8 whose int8 product takes 5.3). Symmetric codes cost the
    # one-sided inputs (after SiLU) about one bit; the UNet's outputs measured as close to fp32 as with
    # per-call asymmetric codes (3.6% vs 3.4% relative error on the built-in model).
    weight_scale: torch.Tensor | None = None  # (out,) fp32
    weight_zero_points: torch.Tensor | None = None  # (out,) int64 zeros: oneDNN's argument for symmetric weights
    compute_dtype: torch.dtype | None = None  # the dtype of the weight it was quantized from

    def _dtype(self) -> torch.dtype:
        return self.compute_dtype if self.packed is not None else super()._dtype()

    def _unpacked(self) -> torch.Tensor:
        weight = self._int8_weight().float()
        return (weight * self.weight_scale.view(-1, *[1] * (weight.ndim - 1))).to(self.compute_dtype)

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, ...) float -> (out, ...) int8, keeping the scales and the dtype."""
        self.compute_dtype = weight.dtype
        weight = weight.float()
        amax = weight.abs().amax(dim=tuple(range(1, weight.ndim))).clamp_min(torch.finfo(torch.float32).tiny)
        self.weight_scale = amax / 127
        self.weight_zero_points = torch.zeros(len(amax), dtype=torch.long)
        codes = torch.round(weight / self.weight_scale.view(-1, *[1] * (weight.ndim - 1))).to(torch.int8)
        return codes.contiguous()  # oneDNN's prepacking reads the memory as row-major, whatever the strides

    def _fast(self, x: torch.Tensor) -> bool:
        return super()._fast(x) and x.dtype in _PACKABLE

    def _activation(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """x (any shape, fp32/bf16) -> (its uint8 codes, scale): x ~ scale * (codes - ZERO_POINT)."""
        low, high = (float(v) for v in torch.aminmax(x))
        scale = max(-low / ZERO_POINT, high / (255 - ZERO_POINT), 1e-12)
        with warnings.catch_warnings():  # deprecated with the quantized dtypes, but torch's one fused quantizer
            warnings.simplefilter("ignore", UserWarning)
            codes = torch.quantize_per_tensor(x.float() if x.dtype != torch.float32 else x, scale, ZERO_POINT,
                                              torch.quint8)
        # The quint8 tensor's bytes as a plain uint8 tensor (int_repr() would copy them, at 5x the cost).
        plain = torch.empty(0, dtype=torch.uint8).set_(codes.untyped_storage(), codes.storage_offset(), codes.shape,
                                                       codes.stride())
        return plain, scale


class Int8Conv2d(_Int8Weight, nn.Conv2d):
    """nn.Conv2d in int8 (`_Int8Weight`); channels_last activations in and out."""

    _plain = nn.Conv2d

    def _reorder(self, weight: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
        # The activation scale given here is a placeholder: each call passes its own.
        return torch.ops.onednn.qconv_prepack(self._quantize(weight), self.weight_scale, 1.0, ZERO_POINT,
                                              list(self.stride), list(self.padding), list(self.dilation), self.groups,
                                              input_shape)

    def _int8_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x) or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return self._conv_forward(x, self.weight, self.bias)
        if self.packed is None:
            self._pack_from(x)
        codes, scale = self._activation(x.contiguous(memory_format=torch.channels_last))
        return torch.ops.onednn.qconv2d_pointwise(
            codes, scale, ZERO_POINT, self.packed, self.weight_scale, self.weight_zero_points, self.bias,
            list(self.stride), list(self.padding), list(self.dilation), self.groups, 1.0, 0, x.dtype, "none", [], "")


class Int8Linear(_Int8Weight, nn.Linear):
    """nn.Linear in int8 (`_Int8Weight`)."""

    _plain = nn.Linear

    def _reorder(self, weight: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(self._quantize(weight), list(input_shape))

    def _int8_weight(self) -> torch.Tensor:
        return self.packed.to_dense().t().contiguous()  # packed as (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        if self.packed is None:
            self._pack_from(x)
        codes, scale = self._activation(x)
        return torch.ops.onednn.qlinear_pointwise(
            codes, scale, ZERO_POINT, self.packed, self.weight_scale, self.weight_zero_points, self.bias, 1.0, 0,
            x.dtype, "none", [], "")


_PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}


def prepack(module: nn.Module) -> nn.Module:
    """Make every Conv2d/Linear of `module` pack its weight for oneDNN at its first inference call."""
    for sub in module.modules():
        packed_class = _PACKED.get(type(sub))
        if packed_class is not None:
            sub.__class__ = packed_class
    return module


def unpack(module: nn.Module) -> nn.Module:
    """Undo `prepack`: plain Conv2d/Linear layers with plain weights again."""
    for sub in module.modules():
        if isinstance(sub, _PackedWeight):
            sub.unpack()
    return module


# Kept in float: the first and last convolutions (4 latent channels: their error would go straight into the
# prediction, and they are a tiny share of the work) and the time-embedding layers (one row per image: nothing
# for the int8 kernels to gain).
_KEPT_IN_FLOAT = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj")
_INT8 = {nn.Conv2d: Int8Conv2d, PackedConv2d: Int8Conv2d, nn.Linear: Int8Linear, PackedLinear: Int8Linear}
QUANTIZATIONS = ("int8",)


def check_quantization(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ParameterError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantize!r}")


def quantize_int8(unet: nn.Module) -> nn.Module:
    """Make the UNet's convolutions and linear layers compute in int8 (`Int8Conv2d`, `Int8Linear`), each
    quantizing its weight when it packs at its first inference call; the rest stays in the weights' dtype."""
    for name, sub in unet.named_modules():
        int8_class = _INT8.get(type(sub))
        if int8_class is None or any(part in _KEPT_IN_FLOAT for part in name.split(".")):
            continue
        if isinstance(sub, _PackedWeight) and sub.packed is not None:
            sub.set_weight(sub.weight)  # plain again: quantized when it packs
        sub.__class__ = int8_class
    return unet


def upcast_attention(module: nn.Module) -> nn.Module:
    """Compute every attention of `module` in fp32 (a no-op for fp32 weights)."""
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.upcast = True
    return module


def compile_unet(unet: nn.Module) -> nn.Module:
    """torch.compile (inductor) of the UNet, with weights frozen into the graph as constants."""
    # Freezing lets inductor pre-pack the conv/linear weights for oneDNN.
    return torch.compile(unet, options={"freezing": True})
