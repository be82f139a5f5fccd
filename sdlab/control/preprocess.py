"""ControlNet preprocessors and control-image resizing, named and computed as sd-webui-controlnet does them.

The weightless detectors follow the extension's `scripts/preprocessor/model_free_preprocessors.py` and
`scripts/preprocessor/legacy/processor.py`: the input goes through `HWC3`, is scaled to `resolution` on its
short side and edge-padded to multiples of 64 (`resize_image_with_pad`), the detector runs on the padded
array and the pad is cut off again. Detectors that need annotator networks are listed so that callers can
show them, but sdlab ships no annotator weights: `preprocess` refuses them with a pointer to module "none".
OpenCV is an optional dependency (`pip install 'sdlab[control]'`), imported only where a detector needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ParameterError

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# internal_controlnet/external_code.py resize_mode_aliases: the names older API clients send.
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
}
RESOLUTION_RANGE = (64, 2048)  # the extension's slider_resolution
MAX_SIDE = 8192  # largest side sdlab will allocate for a control map (a guard the extension lacks)


def _cv2():
    """OpenCV, imported lazily so that sdlab imports without the [control] extra."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError("ControlNet preprocessors need OpenCV: pip install 'sdlab[control]'") from err
    return cv2


# ---------------------------------------------------------------- validation


def _check_image(image, name: str = "image") -> None:
    if not isinstance(image, Image.Image):
        raise ParameterError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ParameterError(f"{name} is {image.width}x{image.height}; both sides must be at least 1 pixel")


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ParameterError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def resize_mode_name(value) -> str:
    """The A1111 name of a resize mode given as a name, an alias or an int (`resize_mode_from_value`)."""
    if isinstance(value, str) and value in RESIZE_MODES + tuple(_RESIZE_ALIASES):
        return _RESIZE_ALIASES.get(value, value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= 3:
        return RESIZE_MODES[0] if value == 3 else RESIZE_MODES[value]  # 3 = 'Just Resize (Latent upscale)'
    valid = ", ".join(repr(v) for v in RESIZE_MODES + tuple(_RESIZE_ALIASES))
    raise ParameterError(f"resize_mode {value!r} is not valid; use one of {valid} or the ints 0, 1, 2")


# ---------------------------------------------------------------- arrays


def _hwc3(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 as annotator/util.py HWC3: grey is replicated, alpha is composited over white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
        alpha = rgba[:, :, 3:4] / 255.0
        return (rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _rgb(x: np.ndarray) -> np.ndarray:
    """HWC3 for a detector's output array: (H, W) or (H, W, 1) becomes (H, W, 3)."""
    x = x[:, :, None] if x.ndim == 2 else x
    return np.ascontiguousarray(np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x)


def _scaled_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """(H, W) after scaling the short side to `resolution`, rounded as the extension rounds (np.round)."""
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    if max(th, tw) > MAX_SIDE:
        raise ParameterError(
            f"image is {w}x{h}; at resolution {resolution} its long side would be {max(th, tw)} pixels, "
            f"more than {MAX_SIDE}: crop it to an aspect ratio nearer 1 or lower the resolution"
        )
    return th, tw


def _resize_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`resize_image_with_pad` (scripts/utils.py): short side to `resolution` (INTER_CUBIC up, INTER_AREA
    down), then edge-pad bottom/right to multiples of 64 so that detectors see the extension's borders.
    Returns the padded (H64, W64, 3) array and the unpadded (H, W) to cut the result back to."""
    cv2 = _cv2()
    th, tw = _scaled_size(img.shape[0], img.shape[1], resolution)
    interpolation = cv2.INTER_CUBIC if resolution > min(img.shape[:2]) else cv2.INTER_AREA
    img = cv2.resize(img, (tw, th), interpolation=interpolation)
    pad = [[0, -th % 64], [0, -tw % 64], [0, 0]]  # pad64: up to the next multiple of 64
    return np.pad(img, pad, mode="edge"), (th, tw)


def _resized(img: np.ndarray, resolution: int) -> np.ndarray:
    """`resize_image_with_pad` followed at once by `remove_pad` (blur_gaussian, shuffle)."""
    padded, (h, w) = _resize_with_pad(img, resolution)
    return padded[:h, :w]


# ---------------------------------------------------------------- detectors: (H, W, 3) uint8 in


def _none(img, resolution, a, b, seed):
    return img  # PreprocessorNone: the picture is already a control map


def _invert(img, resolution, a, b, seed):
    return 255 - img  # PreprocessorInvert: white paper, black lines -> black background, white lines


def _canny(img, resolution, a, b, seed):
    """PreprocessorCanny: cv2.Canny on the padded RGB array (OpenCV takes the strongest channel)."""
    x, (h, w) = _resize_with_pad(img, resolution)
    return _cv2().Canny(x, int(a), int(b))[:h, :w]  # (H, W) uint8 in {0, 255}


def _scribble_xdog(img, resolution, a, b, seed):
    """PreprocessorScribbleXdog: difference of Gaussians (sigma 0.5 and 5), thresholded at `a`."""
    cv2 = _cv2()
    x, (h, w) = _resize_with_pad(img, resolution)
    g1 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)  # (H64, W64)
    darkness = 2 * (255 - dog)  # uint8: wraps above 127 exactly as the extension's expression does
    return np.where(darkness > a, 255, 0).astype(np.uint8)[:h, :w]


def _lineart_standard(img, resolution, a, b, seed):
    """`lineart_standard`: how much darker each pixel is than its sigma-6 surroundings, scaled so that the
    median line (pixels darker by more than 8) reaches 127."""
    x, (h, w) = _resize_with_pad(img, resolution)
    x = x.astype(np.float32)
    intensity = np.min(_cv2().GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)  # (H64, W64)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines))) if lines.size else 16.0  # no lines: the extension's 16
    return (intensity * 127).clip(0, 255).astype(np.uint8)[:h, :w]


def _tile_resample(img, resolution, a, b, seed):
    """`tile_resample`: downsample by factor `a` with INTER_AREA (below 1.1 the image passes unchanged);
    like the extension it ignores `resolution`."""
    if a < 1.1:
        return img
    h, w = max(1, int(img.shape[0] / a)), max(1, int(img.shape[1] / a))
    return _cv2().resize(img, (w, h), interpolation=_cv2().INTER_AREA)


def _blur_gaussian(img, resolution, a, b, seed):
    """PreprocessorBlurGaussian: scale to `resolution`, then cv2.GaussianBlur with sigma `a`."""
    return _cv2().GaussianBlur(_resized(img, resolution), (0, 0), float(a))


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """annotator/util.py make_noise_disk: coarse uniform noise upsampled bicubically, min-max normalised.
    Returns (H, W, 1) float64 in [0, 1]."""
    noise = rng.uniform(low=0, high=1, size=(h // f + 2, w // f + 2, 1))
    noise = _cv2().resize(noise, (w + 2 * f, h + 2 * f), interpolation=_cv2().INTER_CUBIC)[f:f + h, f:f + w]
    noise -= noise.min()
    return (noise / noise.max())[:, :, None]


def _shuffle(img, resolution, a, b, seed):
    """PreprocessorShuffle (annotator/shuffle ContentShuffleDetector, f=256): remap every pixel to a
    smoothly random source position. `RandomState(seed)` draws what the extension's `np.random.seed(seed)`
    followed by `np.random.uniform` draws, so a seed gives the extension's map."""
    x = _resized(img, resolution)
    h, w = x.shape[:2]
    rng = np.random.RandomState(seed)
    flow_x = _noise_disk(rng, h, w, 256) * float(w - 1)  # (H, W, 1) source column
    flow_y = _noise_disk(rng, h, w, 256) * float(h - 1)  # (H, W, 1) source row
    flow = np.concatenate([flow_x, flow_y], axis=2).astype(np.float32)  # (H, W, 2)
    return _cv2().remap(x, flow, None, _cv2().INTER_LINEAR)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Threshold:
    """One slider of the extension's UI (its PreprocessorParameter): label, default and closed range."""

    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 0.01


@dataclass(frozen=True)
class Preprocessor:
    """A ControlNet preprocessor under the extension's module name. `threshold_a`/`threshold_b` are its
    slider_1/slider_2 (None where the extension hides the slider); `uses_resolution` is False where it
    hides the resolution slider; `weights` says where a detector's annotator weights come from."""

    name: str
    description: str
    needs_weights: bool = False
    threshold_a: Threshold | None = None
    threshold_b: Threshold | None = None
    uses_resolution: bool = True
    weights: str = ""
    run: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def thresholds(self) -> dict[str, Threshold]:
        """The visible sliders by argument name ("threshold_a", "threshold_b")."""
        pairs = (("threshold_a", self.threshold_a), ("threshold_b", self.threshold_b))
        return {key: t for key, t in pairs if t is not None}


_ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators"
PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "no preprocessing: the image is already a control map", uses_resolution=False,
                 run=_none),
    Preprocessor("canny", "Canny edges (cv2.Canny)", threshold_a=Threshold("Low Threshold", 100, 1, 255, 1),
                 threshold_b=Threshold("High Threshold", 200, 1, 255, 1), run=_canny),
    Preprocessor("invert", "invert (from white bg & black line)", uses_resolution=False, run=_invert),
    Preprocessor("scribble_xdog", "scribble by XDoG (difference of Gaussians)",
                 threshold_a=Threshold("XDoG Threshold", 32, 1, 64), run=_scribble_xdog),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", run=_lineart_standard),
    Preprocessor("tile_resample", "tile: downsample by a factor", uses_resolution=False,
                 threshold_a=Threshold("Down Sampling Rate", 1.0, 1.0, 8.0), run=_tile_resample),
    Preprocessor("blur_gaussian", "Gaussian blur (for tile models)",
                 threshold_a=Threshold("Sigma", 9.0, 0.01, 64.0), run=_blur_gaussian),
    Preprocessor("shuffle", "content shuffle (random smooth remap, fixed by seed)", run=_shuffle),
    Preprocessor("depth_midas", "MiDaS depth (DPT-Hybrid)", needs_weights=True,
                 weights=f"dpt_hybrid-midas-501f0c75.pt from {_ANNOTATORS}"),
    Preprocessor("openpose", "OpenPose body keypoints", needs_weights=True,
                 weights=f"body_pose_model.pth from {_ANNOTATORS}"),
    Preprocessor("lineart_realistic", "lineart from photographs (informative drawings)", needs_weights=True,
                 weights=f"sk_model.pth from {_ANNOTATORS}"),
)}
# The extension finds a preprocessor by UI label or by internal name; these are the ones that differ.
_ALIASES = {"invert (from white bg & black line)": "invert", "depth": "depth_midas",
            "lineart_standard (from white bg & black line)": "lineart_standard", "lineart": "lineart_realistic"}


def get_preprocessor(name: str) -> Preprocessor:
    """The preprocessor under a module name or one of the extension's labels (`get_preprocessor`)."""
    found = PREPROCESSORS.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
    if found is None:
        raise ParameterError(f"unknown preprocessor {name!r}; valid names: {', '.join(PREPROCESSORS)}")
    return found


def _threshold(proc: Preprocessor, key: str, value) -> float | None:
    """The slider value, its default when None; a value for a hidden slider is ignored as the extension
    ignores it."""
    spec = proc.thresholds.get(key)
    if spec is None:
        return None
    if value is None:
        return float(spec.default)
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not spec.minimum <= value <= spec.maximum:
        raise ParameterError(f"{key} ({spec.label}) of {proc.name} must be a number in "
                             f"{spec.minimum}..{spec.maximum}, got {value!r}")
    return float(value)


def preprocess(name: str, image: Image.Image, *, resolution: int = 512, threshold_a: float | None = None,
               threshold_b: float | None = None, seed: int = 0) -> Image.Image:
    """Run preprocessor `name` on `image` and return the RGB control map (the extension's `cached_call`
    followed by `HWC3`). The map is at the detector's resolution; `resize_control_image` fits it to the
    generation size afterwards, as `detectmap_proc` does."""
    proc = get_preprocessor(name)
    if proc.needs_weights:
        raise ParameterError(
            f"preprocessor {proc.name!r} needs its annotator weights ({proc.weights}), which sdlab does not "
            f"ship; run the detector elsewhere and pass the ready control image with module 'none'")
    _check_image(image)
    resolution = _check_int(resolution, "resolution", *RESOLUTION_RANGE)
    seed = _check_int(seed, "seed", 0, 2**32 - 1)
    a, b = _threshold(proc, "threshold_a", threshold_a), _threshold(proc, "threshold_b", threshold_b)
    out = proc.run(_hwc3(image), resolution, a, b, seed)
    return Image.fromarray(_rgb(out), "RGB")


# ---------------------------------------------------------------- fitting a map to the generation size


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, mode: str) -> int:
    """external_code.pixel_perfect_resolution: the detector resolution whose output, once fitted to
    width x height by `mode`, needs no further scaling. Not clamped to RESOLUTION_RANGE (neither is the
    extension's); callers clamp before `preprocess`."""
    _check_image(image)
    width, height = _check_int(width, "width", 1, MAX_SIDE), _check_int(height, "height", 1, MAX_SIDE)
    k_h, k_w = height / image.height, width / image.width
    k = min(k_h, k_w) if resize_mode_name(mode) == "Resize and Fill" else max(k_h, k_w)
    return int(np.round(k * min(image.height, image.width)))


def _border_median(rgb: np.ndarray) -> tuple[int, ...]:
    """detectmap_proc's fill colour for "Resize and Fill": per-channel median of the four border lines."""
    borders = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)  # (2W + 2H, 3)
    return tuple(int(c) for c in np.median(borders, axis=0).astype(np.uint8))


def resize_control_image(image: Image.Image, width: int, height: int, mode: str = "Crop and Resize") -> Image.Image:
    """Fit a control map to width x height as detectmap_proc does: "Just Resize" stretches, "Crop and
    Resize" scales to cover and crops the centre, "Resize and Fill" scales to fit, centres and fills the
    rest with the border median. Scaling is PIL LANCZOS throughout (diffusers' `image.resize`)."""
    _check_image(image)
    width, height = _check_int(width, "width", 1, MAX_SIDE), _check_int(height, "height", 1, MAX_SIDE)
    mode = resize_mode_name(mode)
    rgb = _hwc3(image)  # (H, W, 3)
    src = Image.fromarray(rgb, "RGB")
    if mode == "Just Resize":
        return src.resize((width, height), Image.LANCZOS)
    k = (max if mode == "Crop and Resize" else min)(height / src.height, width / src.width)
    new_w, new_h = max(1, int(np.round(src.width * k))), max(1, int(np.round(src.height * k)))
    scaled = src.resize((new_w, new_h), Image.LANCZOS)
    if mode == "Crop and Resize":
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), _border_median(rgb))
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def inpaint_hint(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """The inpaint ControlNet's condition as diffusers' `make_inpaint_condition`: (1, 3, H, W) float32,
    RGB in [0, 1], pixels where the mask (as "L", /255) is above 0.5 set to -1."""
    _check_image(image)
    _check_image(mask, "mask")
    if image.size != mask.size:
        raise ParameterError(f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}; "
                             "they must be the same size")
    x = np.array(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    m = np.array(mask.convert("L"), dtype=np.float32) / 255.0  # (H, W)
    x[m > 0.5] = -1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))  # (1, 3, H, W)
