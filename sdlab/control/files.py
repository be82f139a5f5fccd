"""Control networks from files: ControlNets (a diffusers `ControlNetModel` folder, or one file in the original
`control_model.*` layout or in diffusers' keys) and T2I-Adapters (`sdlab.nn.t2i_adapter`). Read safely (no
pickled code runs) and checked key by key before any weight is used.

    canny = load_controlnet("lllyasviel/control_v11p_sd15_canny")          # a folder
    canny = load_controlnet("control_v11p_sd15_canny.safetensors")         # an original single file
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from torch import nn

from sdlab.checkpoints.configs import controlnet_from_diffusers, controlnet_to_diffusers
from sdlab.checkpoints.diffusers_folder import read_json, write_json, read_component_weights
from sdlab.checkpoints.atomic import atomic_folder
from sdlab.checkpoints.io import check_path, read_checkpoint, write_safetensors
from sdlab.control.single_file import read_controlnet_file
from sdlab.errors import CheckpointError
from sdlab.model import check_network_weights
from sdlab.nn.controlnet import ControlNet
from sdlab.nn.t2i_adapter import load_t2i_adapter
from sdlab.perf import prepack

WEIGHTS = "diffusion_pytorch_model"
ADAPTER_MARKERS = ("body.", "adapter.")  # TencentARC's T2I-Adapter keys, and diffusers' T2IAdapter's


def load_control_network(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                         plain: bool = False) -> nn.Module:
    """A ControlNet or a T2I-Adapter, whichever the folder's config.json (_class_name) or the file's keys say."""
    path = Path(path)
    if stat.S_ISDIR(check_path(path).st_mode):
        adapter = read_json(path / "config.json").get("_class_name") == "T2IAdapter"
    else:
        adapter = any(key.startswith(ADAPTER_MARKERS) for key in read_checkpoint(path).tensors)
    if adapter:
        return load_t2i_adapter(path, dtype=dtype, device=device)
    return load_controlnet(path, dtype=dtype, device=device, plain=plain)


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                    variant: str | None = None, plain: bool = False) -> ControlNet:
    """A ControlNet in eval mode, on sdlab's fast path (packed weights on the CPU) unless `plain`."""
    path = Path(path)
    config, weights = _read(path, variant)
    config = controlnet_from_diffusers(config, f"{path} (config)")
    with torch.device("meta"):
        check_network_weights(ControlNet(config), weights, where=str(path))
    net = ControlNet(config).to(dtype)
    net.load_state_dict(weights, strict=True)
    net = net.to(device).eval().requires_grad_(False)
    if not plain and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        prepack(net)
    return net


def _read(path: Path, variant: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    if stat.S_ISDIR(check_path(path).st_mode):
        config = read_json(path / "config.json")
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path / 'config.json'}: not a ControlNetModel config (a diffusers ControlNet "
                                  "folder holds config.json with _class_name ControlNetModel)")
        return config, read_component_weights(path, WEIGHTS, variant)
    return read_controlnet_file(path)


def save_controlnet(net: ControlNet, folder: str | os.PathLike) -> Path:
    """Write `net` as a diffusers ControlNetModel folder (config.json + safetensors), atomically; an existing
    folder is not replaced."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_json(tmp / "config.json", controlnet_to_diffusers(net.cfg))
        write_safetensors(tmp / f"{WEIGHTS}.safetensors", net.state_dict())
    return folder
