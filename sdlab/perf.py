"""Opt-in inference speed-ups for a loaded `Model`: `optimize(model, dtype=torch.bfloat16)`.

The default path (`sdlab.load(...)` in fp32) reproduces the reference implementation to ~1e-5 and is left
alone; everything here is explicit. Each lever is one small function, so that `benchmarks/levers.py` can
switch them one at a time and docs/performance.md reports what each is worth on this machine:

- `convert_dtype`: weights to bf16/fp16, one tensor at a time, so that peak memory is the converted model
  plus one tensor (converting a whole memory-mapped fp32 state dict at once holds both copies);
- `to_channels_last`: NHWC activations for the convolutions (oneDNN's native layout; the transformers'
  NCHW <-> token permutes become free views);
- `use_onednn_linear`: Linear layers through oneDNN instead of the BLAS library (MKL's sgemm does not use
  AVX-512 on AMD CPUs; oneDNN does); keeps the parameters, so state_dict() is unchanged;
- `upcast_attention`: compute attention in fp32 under bf16 weights (torch's CPU flash-attention kernel is
  slower in bf16 than in fp32 at SD's head sizes of 40-160, and fp32 is more accurate too);
- `compile_unet`: torch.compile (inductor) of the UNet. Works offline (it needs a C++ compiler), but costs
  minutes of compilation on a small CPU; off by default.

Changing the dtype changes the numbers (bf16 images differ from fp32 by a few 8-bit levels); the other
levers keep fp32 results within float rounding of the default path (tests/test_perf.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParameterError
from .nn.layers import Attention

log = logging.getLogger(__name__)

_NETWORKS = ("text_encoder", "unet", "vae")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def optimize(model, dtype: torch.dtype | None = None, *, channels_last: bool = True, onednn_linear: bool = True,
             attention_upcast: bool | None = None, compile: bool = False):
    """Apply the inference levers to `model` in place and return it.

    dtype: convert the weights (None keeps them; torch.bfloat16 is ~2x faster on CPUs with AVX-512 BF16).
    attention_upcast: None = on for bf16/fp16 CPU models (faster there); False leaves each attention as its
    config says (never turns off the upcast SD 2.1 needs).
    """
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ParameterError(f"optimize: dtype must be one of {_DTYPES}, got {dtype}")
        for name in _NETWORKS:
            convert_dtype(getattr(model, name), dtype)
    on_cpu = model.device.type == "cpu"
    if channels_last:
        to_channels_last(model.unet)
        to_channels_last(model.vae)
    if onednn_linear and on_cpu and torch.backends.mkldnn.is_available():
        for name in _NETWORKS:
            use_onednn_linear(getattr(model, name))
    if attention_upcast is None:
        attention_upcast = on_cpu and model.dtype in (torch.bfloat16, torch.float16)
    if attention_upcast:  # never switched off here: SD 2.1 needs it in fp16
        upcast_attention(model.unet)
        upcast_attention(model.vae)
    if compile:
        model.unet = compile_unet(model.unet)
    return model


def convert_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters and buffers to `dtype` one tensor at a time, dropping each source
    tensor (often a memory-mapped checkpoint page range) before converting the next."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                converted = tensor.detach().to(dtype)
                table[name] = nn.Parameter(converted, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                    else converted
    return module


def to_channels_last(module: nn.Module) -> nn.Module:
    """NHWC weights for every conv; oneDNN then keeps activations NHWC from the first conv on."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last)
    return module


class OneDNNLinear(nn.Linear):
    """nn.Linear computed by oneDNN's matmul (same parameters, same result up to float rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linear(module: nn.Module) -> nn.Module:
    """Make every nn.Linear of `module` an `OneDNNLinear` (a class swap: parameters and keys unchanged)."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = OneDNNLinear
    return module


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
