"""Steering an image by another image: ControlNet (Zhang et al. 2023) and T2I-Adapter (Mou et al. 2023).

    from sdlab.control import ControlUnit, load_controlnet
    from sdlab.control.preprocess import preprocess
    canny = load_controlnet("control_v11p_sd15_canny.safetensors")        # a folder or a single file
    edges = preprocess("canny", photo)                                     # the weightless preprocessors
    params = GenerationParams(prompt="...", control=(ControlUnit(canny, edges, scale=0.8),))

- `unit`: `ControlUnit`, what a request says about one network and its image, and the family check;
- `files`: reading ControlNets (`load_controlnet`) and T2I-Adapters (`load_t2i_adapter`) safely;
- `preprocess`: control images made from a picture (canny, scribble, lineart, tile, shuffle...) and
  A1111's resize modes;
- the networks are in `sdlab.nn.controlnet` / `sdlab.nn.t2i_adapter`, and what the denoiser does with them
  at every step in `sdlab.diffusion.control`.
"""

from sdlab.control.files import load_control_network, load_controlnet, save_controlnet
from sdlab.control.preprocess import PREPROCESSORS, RESIZE_MODES, resize_control_image
from sdlab.control.unit import CONTROL_MODES, ControlUnit, check_family
from sdlab.nn.t2i_adapter import load_t2i_adapter

__all__ = ["CONTROL_MODES", "PREPROCESSORS", "RESIZE_MODES", "ControlUnit", "check_family", "load_control_network", "load_controlnet",
           "load_t2i_adapter", "resize_control_image", "save_controlnet"]
