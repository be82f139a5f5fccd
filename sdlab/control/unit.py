"""`ControlUnit`: one control network and its image in a request (`GenerationParams.control`), as
sd-webui-controlnet's units and diffusers' ControlNet pipeline arguments describe them.

    from sdlab.control import ControlUnit, load_controlnet
    canny = load_controlnet("control_v11p_sd15_canny.safetensors")
    params = GenerationParams(prompt=..., control=(ControlUnit(canny, edges_image, scale=0.8, end=0.6),))

`bind` turns it into the `BoundControl`s the denoiser uses (sdlab.diffusion.control), once per batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdlab.config import ModelConfig, UNetConfig
from sdlab.control.preprocess import resize_control_image, resize_mode_name
from sdlab.diffusion.control import BoundControl
from sdlab.errors import ParameterError
from sdlab.nn.controlnet import ControlNet

# sdlab's names -> A1111's (sd-webui-controlnet's ControlMode), and how each weighs the residuals:
# (soft scales, steers the unconditional half too)
CONTROL_MODES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
    "guess": "Guess mode",  # diffusers' guess_mode: like "control", with its logspace scales
}
_MODE_RULES = {"balanced": (None, True), "prompt": ("a1111", True), "control": ("a1111", False),
               "guess": ("guess", False)}
MAX_UNITS = 8  # units per request (A1111 allows up to 10; each costs about a UNet encoder per step)
MAX_SCALE = 10.0


@dataclass(frozen=True)
class ControlUnit:
    """What one control unit adds to a request.

    net: a ControlNet (`load_controlnet`) or a T2I-Adapter (`load_t2i_adapter`) for the model's family.
    image: the control image (edges, depth, pose... already preprocessed: `sdlab.control.preprocess`), a
        PIL image, resized to the output size by `resize_mode`; or a tensor (1 or B, C, H, W) at the output
        size, values as the network expects (in [0, 1]; inpainting ControlNets: -1 marks the masked pixels).
    scale: the residuals' weight (diffusers' controlnet_conditioning_scale, A1111's weight).
    start, end: the fraction of the sampling run in which the unit acts (control_guidance_start / _end).
    mode: a CONTROL_MODES key or A1111's name for it.
    resize_mode: A1111's "Just Resize" (stretch, as diffusers does), "Crop and Resize" or "Resize and Fill".
    name, module: the network's and the preprocessor's names, for the image's metadata only.
    """

    net: nn.Module
    image: Image.Image | torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize_mode: str = "Crop and Resize"
    name: str | None = None
    module: str = "none"

    def replace(self, **changes) -> ControlUnit:
        return dataclasses.replace(self, **changes)

    @property
    def mode_key(self) -> str:
        return control_mode_key(self.mode)

    def validate(self, config: ModelConfig, index: int = 0) -> None:
        """Raise ParameterError naming the unit and its bad field, before any model work."""
        where = f"control[{index}]"
        for field, low, high in (("scale", 0.0, MAX_SCALE), ("start", 0.0, 1.0), ("end", 0.0, 1.0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ParameterError(f"{where}.{field} must be a number from {low} to {high}, got {value!r}")
        if self.start > self.end:
            raise ParameterError(f"{where}: start ({self.start}) is after end ({self.end})")
        control_mode_key(self.mode, where)
        resize_mode_name(self.resize_mode)
        if not isinstance(self.image, (Image.Image, torch.Tensor)):
            raise ParameterError(f"{where}.image must be a PIL image or a tensor (1, C, H, W), got "
                                 f"{type(self.image).__name__}")
        check_family(self.net, config, where)

    def bind(self, batch: int, width: int, height: int, sigmas: torch.Tensor, guided: bool,
             device, dtype) -> tuple[BoundControl, BoundControl | None]:
        """(the unit over the B conditional samples, over the B unconditional ones or None without CFG)."""
        hint = self._hint(batch, width, height).to(device, dtype)  # (B, C, H, W)
        soft, both_halves = _MODE_RULES[self.mode_key]
        pooled = isinstance(self.net, ControlNet) and self.net.cfg.global_pool
        inputs = (hint,) if isinstance(self.net, ControlNet) else tuple(self.net(hint))
        cond = BoundControl(self.net, inputs, torch.ones(batch, device=device), sigmas.to(device), float(self.scale),
                            float(self.start), float(self.end), soft)
        if not guided:
            return cond, None
        steers = both_halves and not pooled
        return cond, dataclasses.replace(cond, weight=cond.weight * float(steers))

    def _hint(self, batch: int, width: int, height: int) -> torch.Tensor:
        channels = _input_channels(self.net)
        image = self.image
        if isinstance(image, Image.Image):
            image = resize_control_image(image, width, height, resize_mode_name(self.resize_mode))
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.float32).reshape(height, width, -1) / 255.0
            image = torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, C, H, W) in [0, 1]
        if image.ndim != 4 or image.shape[0] not in (1, batch) or tuple(image.shape[1:]) != (channels, height, width):
            raise ParameterError(f"a control image given as a tensor must have shape (1 or {batch}, {channels}, "
                                 f"{height}, {width}) (the output size), got {tuple(image.shape)}; pass a PIL image to "
                                 "have it resized")
        return image.float().expand(batch, -1, -1, -1)


def control_mode_key(mode, where: str = "control mode") -> str:
    """sdlab's key for a mode given by key, by A1111's name, or as A1111's index 0-2."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < 3:
        return list(CONTROL_MODES)[mode]
    for key, label in CONTROL_MODES.items():
        if mode in (key, label):
            return key
    raise ParameterError(f"{where}: unknown control mode {mode!r}; valid: {', '.join(CONTROL_MODES)} "
                         f"(or A1111's {', '.join(repr(v) for v in list(CONTROL_MODES.values())[:3])})")


def _input_channels(net: nn.Module) -> int:
    return net.cfg.conditioning_channels if isinstance(net, ControlNet) else net.cfg.in_channels


_FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def check_family(net: nn.Module, config: ModelConfig, where: str = "control") -> None:
    """Raise ParameterError unless `net`'s residuals fit the model's UNet (same family and widths)."""
    unet = config.unet
    if isinstance(net, ControlNet):
        theirs = net.cfg.unet
        fits = (theirs.context_dim, theirs.channels, theirs.layers_per_block, theirs.added_condition,
                theirs.added_dim) == (unet.context_dim, unet.channels, unet.layers_per_block, unet.added_condition,
                                      unet.added_dim)
        if not fits:
            raise ParameterError(f"{where}: the ControlNet is for {_describe(theirs)} but the model "
                                 f"{config.name!r} is {_describe(unet)}; pick a ControlNet made for the model's family")
        return
    cfg = getattr(net, "cfg", None)
    widths = getattr(cfg, "channels", None)
    if widths is None:
        raise ParameterError(f"{where}: the control network must be a ControlNet or a T2I-Adapter "
                             f"(sdlab.control.load_controlnet / load_t2i_adapter), got {type(net).__name__}")
    wanted = tuple(unet.channels) + (unet.channels[-1],) * max(0, len(widths) - len(unet.channels))
    if tuple(widths) != wanted[: len(widths)]:
        raise ParameterError(f"{where}: the T2I-Adapter's feature widths {tuple(widths)} do not fit the model "
                             f"{config.name!r} (UNet widths {tuple(unet.channels)}); pick an adapter made for "
                             "the model's family")


def _describe(cfg: UNetConfig) -> str:
    family = _FAMILY_BY_CONTEXT.get(cfg.context_dim)
    shape = f"a UNet of text width {cfg.context_dim} and block widths {tuple(cfg.channels)}"
    return f"{shape} ({family})" if family else shape
