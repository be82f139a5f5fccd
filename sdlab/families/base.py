"""What a model family is: the interface every `sdlab.families.<name>` module implements.

A family is everything that differs between SD 1.x, SD 2.x, SDXL, ...: its presets, how its files are
recognised (single-file keys and shapes; a diffusers `model_index.json` and component configs), how its
weights are named in the original single-file layout (key maps, as data), which networks it has, what
its denoising network is conditioned on (its conditioner) and its latent format.
Code outside `sdlab/families/` asks the family (`sdlab.families.family_of(config)`) instead of testing
which family a model is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..diffusion.conditioning import Conditioning
from ..errors import ParameterError

Pair = tuple[str, str]  # (original prefix, diffusers prefix)
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyMap:
    """How one network's weights are named in the original layout (`root` + pairs) and in diffusers.

    A key is renamed by its longest listed prefix (ending on a `.` boundary); the rest of the key is kept.
    Two things are not renamings and are listed separately: `fused_qkv` (one (3*width, width) `in_proj`
    matrix in the original, q/k/v projections in diffusers) and `conv1x1` (diffusers Linear layers that the
    original stores as (C, C, 1, 1) convolutions).
    """

    root: str  # the prefix of all of this network's keys in the original file
    pairs: tuple[Pair, ...]
    fused_qkv: tuple[Pair, ...] = ()  # (original `...attn.in_proj` stem, diffusers attention module)
    conv1x1: frozenset[str] = frozenset()  # diffusers Linear modules stored as 1x1 convolutions
    # Original keys (after `root`, whole keys or prefixes on a `.` boundary) that hold no weight sdlab uses.
    ignored: tuple[str, ...] = ()
    # (prefix after `root`, n): numbered blocks `prefix + "N."` with N >= n are unused (a text tower's last
    # layers past the one the family conditions on).
    unused_blocks: tuple[tuple[str, int], ...] = ()
    # (original key after `root`, diffusers key): matrices the original stores transposed (OpenCLIP's
    # `text_projection` is applied as x @ P, a Linear's weight as x @ W.T).
    transposed: tuple[Pair, ...] = ()


@dataclass(frozen=True)
class Component:
    """One network of a family: how sdlab builds it, its config, and how a diffusers folder stores it
    (`<name>/config.json` + weights, and the tokenizer folder of a text encoder).

    `read_config(config_json, where, pad_token_id)` turns the folder's config.json into the network's config
    (`pad_token_id`: the padding token its tokenizer folder names, for text encoders; errors name `where`);
    `write_config(network_config, model_config)` gives the config.json to write (some need model-wide sizes:
    the UNet's sample size). The config itself is `model_config.network(name)`.
    """

    name: str  # the sub-folder and the attribute of `Model`: "unet", "vae", "text_encoder", "text_encoder_2"
    build: Callable[[ModelConfig], nn.Module]  # the network of a config (random weights; meta device to load)
    library: str  # what model_index.json names: ("diffusers" | "transformers", class name)
    classes: tuple[str, ...]  # the class names sdlab reads; the first is the one it writes
    weights_name: str  # the weight file's stem: "diffusion_pytorch_model" or "model"
    config_class: type  # its frozen config dataclass (UNetConfig, VAEConfig, TextEncoderConfig, ...)
    read_config: Callable[[Mapping[str, Any], str, int | None], Any]
    write_config: Callable[[Any, ModelConfig], dict[str, Any]]
    tokenizer: str | None = None  # a text encoder's tokenizer folder: "tokenizer", "tokenizer_2"
    # The kohya-ss LoRA key prefix of its layers ("lora_unet_", "lora_te_"; SDXL "lora_te1_", "lora_te2_").
    lora_prefix: str | None = None
    # A text encoder's padding token when its tokenizer folder names none (None: the family's default).
    default_pad_token_id: int | None = None


@dataclass(frozen=True)
class LatentFormat:
    """How the VAE's latents z relate to the latents diffusion works on: x = scale * (z - shift).

    The scale (and shift) were chosen at training time to give diffusion roughly unit-variance latents:
    SD 1.x/2.x 0.18215, SDXL 0.13025, SD3 1.5305 with shift 0.0609.
    """

    channels: int  # latent channels: 4 for SD 1.x/2.x/SDXL, 16 for SD3/Flux
    scale: float
    shift: float = 0.0

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) -> the latents the UNet sees."""
        return self.scale * (z - self.shift)

    def from_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's latents (B, C, h, w) -> VAE latents, for the VAE decoder."""
        return x / self.scale + self.shift


def names_component(index: Mapping[str, Any], name: str) -> bool:
    """Whether a diffusers model_index.json names a component (diffusers writes [null, null] for an absent
    one, as the SDXL refiner's index does for its missing first text encoder)."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


class Family:
    """A model family. Subclasses set the class attributes and implement the methods; one instance each."""

    name: str  # short and stable: stored in ModelConfig.family ("sd1", "sd2")
    label: str  # what users read in messages: "SD 1.x (OpenAI CLIP ViT-L/14 text encoder, ...)"
    presets: tuple[ModelConfig, ...]
    components: Mapping[str, Component]  # in the order they are built (random weights depend on it)
    pipelines: Mapping[str, str]  # diffusers pipeline class by kind: "txt2img", "inpaint"
    # diffusers' pipeline class for each task of its AutoPipelines: "text2image", "image2image", "inpainting".
    task_pipelines: Mapping[str, str]
    default_pad_token_id: int  # the padding token when a folder's tokenizer names none
    default_guidance: float = 7.0  # the CFG scale of its diffusers pipelines (SD 7.5 in diffusers, 7 in A1111)
    diffusers_scheduler: str | None = None  # the scheduler class its folders ship (None: SD's PNDM / DDIM)

    def matches_keys(self, keys: Collection[str]) -> bool:
        """Whether an original-layout state dict with these keys is of this family."""
        raise NotImplementedError

    def matches_folder(self, index: Mapping[str, Any], component_configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether a diffusers folder (its model_index.json, and config.json by component) is of this family."""
        raise NotImplementedError

    def normalize_keys(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """Original-layout keys as the key maps name them (older tools wrote some differently)."""
        return dict(state_dict)

    def config_from_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], prediction: str | None
    ) -> ModelConfig:
        """The ModelConfig of an original-layout state dict of this family, sizes read off its shapes."""
        raise NotImplementedError

    def keymaps(self, config: ModelConfig) -> dict[str, KeyMap]:
        """The original-layout key map of each network, by component name."""
        raise NotImplementedError

    def latent_format(self, config: ModelConfig) -> LatentFormat:
        """The latent format of `config`: its VAE's channels and the scale/shift its config.json states."""
        vae = config.vae
        return LatentFormat(vae.latent_channels, vae.scaling_factor, vae.shift_factor)

    def condition(self, model, prompts: list[str], negatives: list[str] | None, params, *,
                  prompts_2: list[str] | None = None, negatives_2: list[str] | None = None,
                  zero_empty_negatives: bool | None = None) -> tuple[Conditioning, Conditioning | None]:
        """The family's conditioner for generation: B prompts and their B negative prompts (None: no
        classifier-free guidance) -> (cond, uncond), the `Conditioning`s its denoising network takes, on the
        model's device and dtype. `prompts_2` / `negatives_2` are the B texts of the second text encoder
        (`text_encoder_2`, diffusers' prompt_2; None: the same as the first); families with one encoder
        refuse texts that differ (`check_second_prompts`). `params` (resolved `GenerationParams`) gives clip
        skip and, for SDXL, the size and crop conditions. `zero_empty_negatives` overrides whether an empty
        negative prompt is encoded or conditions on zeros, in families that zero them (None: the family's own
        rule)."""
        raise NotImplementedError

    @property
    def takes_second_prompt(self) -> bool:
        """Whether the family has a second text encoder (`text_encoder_2`), the one `prompt_2` feeds."""
        return "text_encoder_2" in self.text_encoders

    def check_second_prompts(self, config: ModelConfig, field: str, firsts: Sequence[str],
                             seconds: Sequence[str | None] | None) -> None:
        """ParameterError when `field` ("prompt_2" or "negative_prompt_2") gives a family with one text
        encoder texts that differ from the first prompts (None and equal texts are the one prompt)."""
        if self.takes_second_prompt or seconds is None:
            return
        first_field = field.removesuffix("_2")
        for first, second in zip(firsts, seconds, strict=True):
            if second is not None and second != first:
                raise ParameterError(
                    f"{field}={second!r}, but {config.name} ({self.label}) has one text encoder, which encodes "
                    f"{first_field}; leave {field} unset (a second prompt needs a model with a second text "
                    f"encoder, such as SDXL)")

    def clip_skip_limit(self, config: ModelConfig) -> int:
        """The largest clip skip the text encoders allow (1 = the layer the family conditions on)."""
        return min(config.network(name).num_layers for name in self.text_encoders)

    def explain_mismatch(self, keys: Collection[str]) -> str | None:
        """Why a single file that looks like one of this family's (but matched none) is not, or None."""
        return None

    def model_index_extras(self, config: ModelConfig) -> dict[str, Any]:
        """Pipeline settings this family's diffusers `model_index.json` carries beyond the components."""
        return {}

    def conditioner_inputs(
        self, model, prompts: list[str], extras: Sequence[Mapping[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        """What the conditioner needs for B plain prompts (no prompt syntax; each text encoder's own context
        length, which small trained models may keep under 77) and their per-sample extra conditions (SDXL:
        original size, crop), as batch tensors on the model's device: training slices them per process and
        hands them to `condition_from_inputs` inside its objective. SD 1.x/2.x: {"text_encoder": ids (B, T)}."""
        raise NotImplementedError

    def condition_from_inputs(
        self, networks: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]
    ) -> Conditioning:
        """The `Conditioning` of `conditioner_inputs(...)`, computed by `networks` by component name (the
        model's, or those a training objective holds, so gradients reach a text encoder being trained)."""
        raise NotImplementedError

    @property
    def text_encoders(self) -> list[str]:
        """The components that encode prompts: those with a tokenizer."""
        return [name for name, c in self.components.items() if c.tokenizer]

    def pipeline_class(self, config: ModelConfig) -> str:
        return self.pipelines["inpaint" if config.is_inpainting else "txt2img"]

    def __repr__(self) -> str:
        return f"<family {self.name}>"
