"""The T2I-Adapter network (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability
for Text-to-Image Diffusion Models"): a small conv net that turns a control image (edges, depth, pose, ...) into
one feature map per UNet level, which the UNet adds to its encoder's hidden states.

    image (B, C, H, W) in [0, 1] --pixel unshuffle by downscale_factor--> (B, C*f*f, H/f, W/f)
      --[conv_in 3x3]--> per block: [avg-pool 2x] [1x1 in_conv] res blocks [1x1 out_conv] --> one feature each

The `state_dict()` keys and the outputs equal diffusers' `T2IAdapter` (keys under `adapter.`) for its three
`adapter_type`s; `read_t2i_adapter` also reads the original TencentARC single files (`t2iadapter_*_sd15v2.pth`).

Where the features go (diffusers' `UNet2DConditionModel.forward`, `down_intrablock_additional_residuals`; the
pipeline multiplies them by `adapter_conditioning_scale`, repeats them for CFG, and passes a fresh clone at each
step, since the UNet pops them off the list). Features are consumed in order, one per down block:
  - a down block with cross-attention adds the next feature to its last (resnet, attention) output, before its
    downsampler: that sum is the block's last skip and what the downsampler sees;
  - a down block without attention (DownBlock2D) adds it in place to its final output (after the downsampler if
    it has one), which is also the tensor it returned as its last skip, so the skip carries it too;
  - if a feature is left after the down blocks and its shape equals the mid block's output, it is added there.
SD 1.x/2.x, 512x512 (latents 64x64), "full_adapter" or "light_adapter" (total downscale 64): features
  (320, 64, 64) -> down 0 (cross-attn), (640, 32, 32) -> down 1, (1280, 16, 16) -> down 2, (1280, 8, 8) -> down 3
  (DownBlock2D, no downsampler). Nothing reaches the mid block.
SDXL, 1024x1024 (latents 128x128), "full_adapter_xl" (downscale_factor 16, total 32): (320, 64, 64) -> down 0
  (DownBlock2D, after its downsampler: 128 -> 64), (640, 64, 64) -> down 1 (cross-attn, before its downsampler),
  (1280, 32, 32) -> down 2 (cross-attn), (1280, 32, 32) -> the mid block's output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlab.checkpoints.diffusers_folder import read_json, read_component_weights
from sdlab.checkpoints.io import quoted_key, read_state_dict
from sdlab.errors import CheckpointError, ParameterError

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
WEIGHTS_NAME = "diffusion_pytorch_model"  # in a diffusers folder: .safetensors, sharded, or .bin
ORIGINAL_DOWNSCALE = 8  # the TencentARC single files are all SD 1.x adapters with pixel unshuffle by 8

# Original TencentARC key <-> ours (= diffusers'), one row per tensor kind. {i}: block (level), {j}: res block in
# it, {p}: weight or bias. The full adapter's original body is one flat list of res blocks, {n} = i * blocks + j,
# whose first block of a level holds the level's in_conv; the light adapter's nests them under `body.{i}.body`.
FULL_KEYS = (
    ("adapter.conv_in.{p}", "conv_in.{p}"),
    ("adapter.body.{i}.in_conv.{p}", "body.{n}.in_conv.{p}"),
    ("adapter.body.{i}.resnets.{j}.block1.{p}", "body.{n}.block1.{p}"),
    ("adapter.body.{i}.resnets.{j}.block2.{p}", "body.{n}.block2.{p}"),
)
LIGHT_KEYS = (
    ("adapter.body.{i}.in_conv.{p}", "body.{i}.in_conv.{p}"),
    ("adapter.body.{i}.resnets.{j}.block1.{p}", "body.{i}.body.{j}.block1.{p}"),
    ("adapter.body.{i}.resnets.{j}.block2.{p}", "body.{i}.body.{j}.block2.{p}"),
    ("adapter.body.{i}.out_conv.{p}", "body.{i}.out_conv.{p}"),
)


@dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3  # 1 for the sketch adapters
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # light adapter: one fewer than its blocks
    num_res_blocks: int = 2
    downscale_factor: int = 8  # SDXL's "full_adapter_xl": 16
    adapter_type: str = "full_adapter"

    def __post_init__(self):
        for name in ("in_channels", "num_res_blocks", "downscale_factor"):
            _check_positive_int(name, getattr(self, name))
        if not isinstance(self.channels, tuple) or not self.channels:
            raise ParameterError(f"channels: expected a non-empty tuple of positive integers, got {self.channels!r}")
        for c in self.channels:
            _check_positive_int("channels", c)
        if self.adapter_type not in ADAPTER_TYPES:
            raise ParameterError(f"adapter_type: {self.adapter_type!r} is not one of {list(ADAPTER_TYPES)}")
        if self.adapter_type == "light_adapter" and min(self.channels) < 4:
            raise ParameterError("channels: the light adapter's blocks work at channels // 4, so each must be >= 4")
        if self.adapter_type == "full_adapter_xl" and (
                len(self.channels) < 3 or len(set(self.channels[2:])) != 1):
            raise ParameterError("channels: the XL adapter needs at least 3, all equal from the third on")

    @classmethod
    def from_diffusers(cls, config: Mapping) -> T2IAdapterConfig:
        """From a diffusers T2IAdapter config.json dict (fields it lacks take diffusers' defaults)."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        if isinstance(values.get("channels"), list):
            values["channels"] = tuple(values["channels"])
        return cls(**values)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name}: expected a positive integer, got {value!r}")


def _block_specs(cfg: T2IAdapterConfig) -> list[tuple[int, int, bool]]:
    """(in channels, out channels, downsample first) of each block, as diffusers builds them."""
    c = cfg.channels
    if cfg.adapter_type == "full_adapter":  # one 2x downsample per level after the first
        return [(c[0], c[0], False)] + [(c[i - 1], c[i], True) for i in range(1, len(c))]
    if cfg.adapter_type == "full_adapter_xl":  # SDXL has 3 UNet levels: only the third block downsamples
        return [(c[i - 1] if i in (1, 2) else c[i], c[i], i == 2) for i in range(len(c))]
    unshuffled = cfg.in_channels * cfg.downscale_factor**2  # light: no conv_in, and one more block than channels
    return [(unshuffled, c[0], False)] + [(c[i], c[i + 1], True) for i in range(len(c) - 1)] + [(c[-1], c[-1], True)]


class _ResBlock(nn.Module):
    """x + block2(relu(block1(x))): block2 is 1x1 in the full adapters, 3x3 in the light one."""

    def __init__(self, channels: int, kernel2: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, kernel2, padding=kernel2 // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class _Block(nn.Module):
    """[2x avg-pool] [1x1 in_conv] res blocks [1x1 out_conv]. The light adapter's res blocks run at out // 4
    channels between its in_conv and out_conv; the full adapters' at out, with an in_conv only if in != out."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool, light: bool):
        super().__init__()
        self.down = down
        width = cout // 4 if light else cout
        self.in_conv = nn.Conv2d(cin, width, 1) if light or cin != cout else None
        self.resnets = nn.Sequential(*[_ResBlock(width, 3 if light else 1) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(width, cout, 1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)  # (B, C, ceil(h/2), ceil(w/2))
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return x if self.out_conv is None else self.out_conv(x)


class _Layers(nn.Module):
    """Holds the layers under `adapter.`, the prefix of diffusers' keys (its T2IAdapter wraps one such module)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        light = cfg.adapter_type == "light_adapter"
        unshuffled = cfg.in_channels * cfg.downscale_factor**2
        self.conv_in = None if light else nn.Conv2d(unshuffled, cfg.channels[0], 3, padding=1)
        self.body = nn.ModuleList(
            [_Block(cin, cout, cfg.num_res_blocks, down, light) for cin, cout, down in _block_specs(cfg)])


class T2IAdapter(nn.Module):
    """forward(image (B, in_channels, H, W) in [0, 1], H and W multiples of downscale_factor) -> one feature per
    block, (B, channels, H / s, W / s) at s = downscale_factor * 2**(downsamples so far); see the module docstring
    for the UNet levels each goes to."""

    def __init__(self, cfg: T2IAdapterConfig = T2IAdapterConfig()):
        super().__init__()
        self.cfg = cfg
        self.adapter = _Layers(cfg)

    @property
    def downscale_factor(self) -> int:
        return self.cfg.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller than the image the last feature is (image sizes should be multiples of it)."""
        return self.cfg.downscale_factor * 2 ** sum(down for _, _, down in _block_specs(self.cfg))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        f = self.cfg.downscale_factor
        if image.ndim != 4 or image.shape[1] != self.cfg.in_channels or image.shape[2] % f or image.shape[3] % f:
            raise ParameterError(f"T2I-Adapter input: expected (B, {self.cfg.in_channels}, H, W) with H and W "
                                 f"multiples of {f}, got {tuple(image.shape)}")
        x = F.pixel_unshuffle(image, f)  # (B, C * f * f, H / f, W / f)
        if self.adapter.conv_in is not None:
            x = self.adapter.conv_in(x)
        features = []
        for block in self.adapter.body:
            x = block(x)
            features.append(x)
        return features


# --- checkpoints -------------------------------------------------------------------------------------------


def original_key_map(cfg: T2IAdapterConfig) -> dict[str, str]:
    """{our key: original TencentARC key} for every tensor of a "full_adapter" or "light_adapter" of `cfg`."""
    rows = LIGHT_KEYS if cfg.adapter_type == "light_adapter" else FULL_KEYS
    patterns = [(re.compile(re.escape(ours).replace(r"\{p\}", "(?P<p>weight|bias)")
                            .replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")), theirs)
                for ours, theirs in rows]
    mapping = {}
    for key in _expected_shapes(cfg):
        match, theirs = next((m, t) for pattern, t in patterns if (m := pattern.fullmatch(key)))
        i, j = int(match.groupdict().get("i") or 0), int(match.groupdict().get("j") or 0)
        mapping[key] = theirs.format(i=i, j=j, n=i * cfg.num_res_blocks + j, p=match["p"])
    return mapping


def read_t2i_adapter(path: str | Path, *, variant: str | None = None
                     ) -> tuple[T2IAdapterConfig, dict[str, torch.Tensor]]:
    """(config, state dict with our keys) of a diffusers T2IAdapter folder or an original TencentARC file."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        raw = read_json(config_file)
        if raw.get("_class_name", "T2IAdapter") != "T2IAdapter":
            raise CheckpointError(f"{config_file}: not a T2IAdapter config (its _class_name is not 'T2IAdapter')")
        try:
            cfg = T2IAdapterConfig.from_diffusers(raw)
        except ParameterError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        tensors = read_component_weights(path, WEIGHTS_NAME, variant)
    else:
        tensors = read_state_dict(path)
        cfg = _original_config(tensors, path)
        inverse = {theirs: ours for ours, theirs in original_key_map(cfg).items()}
        tensors = {inverse.get(k, k): v for k, v in tensors.items()}
    _check_state_dict(cfg, tensors, path)
    return cfg, tensors


def load_t2i_adapter(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     variant: str | None = None) -> T2IAdapter:
    """A T2IAdapter in eval mode with the weights of `path` (see `read_t2i_adapter`), all keys checked."""
    cfg, tensors = read_t2i_adapter(path, variant=variant)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = T2IAdapter(cfg)
    tensors = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _expected_shapes(cfg: T2IAdapterConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in T2IAdapter(cfg).state_dict().items()}


def _original_config(tensors: Mapping[str, torch.Tensor], path: Path) -> T2IAdapterConfig:
    """The config of an original TencentARC file, from its tensor names and shapes. Its full adapters have 4
    levels (the SD 1.x UNet's), so blocks per level = body length / 4; its light adapters 4 blocks, 3 channels."""
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"body\.(\d+)\.", k))}
    try:
        if any(re.fullmatch(r"body\.\d+\.out_conv\.weight", k) for k in tensors):
            channels = tuple(tensors[f"body.{i}.out_conv.weight"].shape[0] for i in range(len(blocks) - 1))
            res = {k.split(".")[3] for k in tensors if k.startswith("body.0.body.")}
            unshuffled, kind, per_level = tensors["body.0.in_conv.weight"].shape[1], "light_adapter", len(res)
        else:
            per_level = len(blocks) // 4
            channels = tuple(tensors[f"body.{i * per_level}.block1.weight"].shape[0] for i in range(4))
            unshuffled, kind = tensors["conv_in.weight"].shape[1], "full_adapter"
        return T2IAdapterConfig(in_channels=unshuffled // ORIGINAL_DOWNSCALE**2, channels=channels,
                                num_res_blocks=per_level, downscale_factor=ORIGINAL_DOWNSCALE, adapter_type=kind)
    except (KeyError, IndexError, ParameterError):
        raise CheckpointError(
            f"{path}: not a T2I-Adapter file in the original TencentARC layout (conv_in.weight and body.N.block1/"
            "block2, or the light adapter's body.N.in_conv/body.N.body.M/body.N.out_conv); a diffusers T2IAdapter "
            "is read from its folder (config.json + weights)") from None


def _check_state_dict(cfg: T2IAdapterConfig, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Every tensor `cfg`'s adapter has, of its shape, and nothing else: else a CheckpointError naming a few."""
    expected = _expected_shapes(cfg)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & tensors.keys()
                   if tuple(tensors[k].shape) != expected[k] or not tensors[k].is_floating_point())
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(quoted_key(k) for k in keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        problems = [f"{what} {few(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", wrong)) if keys]
        raise CheckpointError(f"{path}: does not match a T2I-Adapter ({cfg.adapter_type}, channels "
                              f"{list(cfg.channels)}, in_channels {cfg.in_channels}): {'; '.join(problems)}")
