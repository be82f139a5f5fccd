"""The model-family registry (sdlab.families): each family owns its presets, detection and key maps, and
detection must find exactly one family."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoints_support import TINY_SD1, TINY_SD2, reference_state_dicts

from sdlab import families
from sdlab.checkpoints import diffusers_to_ldm, load_checkpoint, read_checkpoint, save_diffusers, save_single_file
from sdlab.checkpoints.single_file import CONFIG_KEY
from sdlab.config import PRESETS, SD15, TINY
from sdlab.errors import CheckpointError, ParameterError
from sdlab.model import Model


def test_every_preset_belongs_to_the_family_that_lists_it():
    for family in families.FAMILIES.values():
        assert family.presets and all(p.family == family.name for p in family.presets)
    assert PRESETS is families.PRESETS
    assert families.family_of(SD15) is families.FAMILIES["sd1"]


def test_a_config_of_an_unknown_family_is_refused():
    with pytest.raises(CheckpointError, match="unknown model family 'sd9'.*sd1.*sd2"):
        families.family_of(SD15.replace(family="sd9"))


def test_keys_of_two_families_are_ambiguous_and_name_the_candidates():
    sd1 = diffusers_to_ldm(reference_state_dicts(TINY_SD1, device="meta"), TINY_SD1)
    sd2 = diffusers_to_ldm(reference_state_dicts(TINY_SD2, device="meta"), TINY_SD2)
    both = {**sd1, **{k: v for k, v in sd2.items() if k.startswith("cond_stage_model.")}}
    with pytest.raises(CheckpointError, match=r"x\.safetensors: ambiguous architecture.*\(sd1, sd2\)"):
        families.detect_single_file(both.keys(), "x.safetensors")
    assert families.detect_single_file(sd2.keys()).name == "sd2"


def test_folder_detection_goes_by_the_text_encoders_config():
    index = {"unet": [], "vae": [], "text_encoder": []}
    assert families.detect_folder(index, {"text_encoder": {"hidden_act": "gelu"}}, "m").name == "sd2"
    assert families.detect_folder(index, {"text_encoder": {}}, "m").name == "sd1"
    with pytest.raises(CheckpointError, match="m: unknown architecture: no model family matches"):
        families.detect_folder(index, {"text_encoder": {"hidden_act": "relu"}}, "m")


def test_sdlab_file_written_before_configs_named_their_family_loads_by_its_keys(tmp_path):
    """A stored sdlab.config without "family" (older sdlab): the family comes from the keys, not sd1."""
    states = reference_state_dicts(TINY_SD2)
    path = save_single_file(tmp_path / "new.safetensors", TINY_SD2, states)
    raw = read_checkpoint(path)
    stored = json.loads(raw.metadata[CONFIG_KEY])
    del stored["family"]
    old = tmp_path / "old.safetensors"
    save_file(raw.tensors, str(old), metadata={**raw.metadata, CONFIG_KEY: json.dumps(stored)})
    assert load_checkpoint(old).config == TINY_SD2


def test_latent_format_is_the_vaes_scale_and_shift_both_ways():
    vae = dataclasses.replace(SD15.vae, scaling_factor=1.5305, shift_factor=0.0609)
    latents = families.latent_format(SD15.replace(vae=vae))
    assert (latents.channels, latents.scale, latents.shift) == (4, 1.5305, 0.0609)
    z = torch.randn(2, 4, 3, 3)
    assert torch.equal(latents.to_diffusion(z), 1.5305 * (z - 0.0609))
    assert torch.allclose(latents.from_diffusion(latents.to_diffusion(z)), z, atol=1e-6)


def test_a_model_holds_the_networks_its_family_declares_by_name(tmp_path):
    model = Model.build(TINY)
    assert list(model.components) == list(families.family_of(TINY).components)
    assert model.unet is model.components["unet"] and model.text_encoder is model.components["text_encoder"]
    replacement = torch.nn.Identity()
    model.vae = replacement  # replacing a network replaces the component (as perf's compiled UNet does)
    assert model.components["vae"] is replacement
    with pytest.raises(AttributeError, match="text_encoder_2"):
        model.text_encoder_2


def test_saving_needs_a_state_dict_for_every_component(tmp_path):
    states = reference_state_dicts(TINY_SD1, device="meta")
    del states["vae"]
    with pytest.raises(ParameterError, match=r"components \['text_encoder', 'unet', 'vae'\]"):
        save_diffusers(tmp_path / "m", TINY_SD1, states)
