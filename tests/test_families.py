"""The model-family registry (sdlab.families): each family owns its presets, detection and key maps, and
detection must find exactly one family."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoints_support import TINY_SD1, TINY_SD2, reference_state_dicts
from test_train_diffusion import tiny_config

from sdlab import families
from sdlab.checkpoints import diffusers_to_ldm, load_checkpoint, read_checkpoint, save_diffusers, save_single_file
from sdlab.checkpoint_info import describe_checkpoint, format_info
from sdlab.checkpoints import configs
from sdlab.checkpoints.diffusers_folder import read_folder_config
from sdlab.checkpoints.single_file import CONFIG_KEY
from sdlab.config import PRESETS, SD15, TINY, TextEncoderConfig
from sdlab.cost import cost_model
from sdlab.errors import CheckpointError, ParameterError
from sdlab.lora import adaptable_modules, default_targets
from sdlab.model import Model
from sdlab.nn.clip import TextEncoder
from sdlab.train.config import model_config_from_dict, model_config_to_dict
from sdlab.train.tasks import DiffusionTask


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


# --- a family with a second text encoder (as SDXL has), declared only in its own module ----------------


class TwoTextEncoders(families.sd1.SD1):
    """SD 1.x with a second CLIP (`text_encoder_2`, its own `tokenizer_2` padding with "!"): what SDXL adds."""

    name = "two-te"
    components = {
        **families.sd1.COMPONENTS,
        "text_encoder_2": dataclasses.replace(
            families.sd1.COMPONENTS["text_encoder"], name="text_encoder_2", tokenizer="tokenizer_2",
            build=lambda c: TextEncoder(c.network("text_encoder_2")), lora_prefix="lora_te2_",
        ),
    }

    def matches_folder(self, index, component_configs):
        return "text_encoder_2" in index


TWO_TE = TINY.replace(
    name="tiny-two-te", family="two-te",
    extra_networks={"text_encoder_2": TextEncoderConfig(width=48, num_layers=2, num_heads=4, mlp_width=96,
                                                       pad_token_id=0)},
)


@pytest.fixture
def two_text_encoders(monkeypatch):
    family = TwoTextEncoders()
    # Without SDXL, whose folders (two text encoders) this made-up family's would also match.
    others = tuple(f for f in families._REGISTERED if not f.name.startswith("sdxl"))
    monkeypatch.setattr(families, "_REGISTERED", (*others, family))
    monkeypatch.setitem(families.FAMILIES, family.name, family)
    return family


def test_extra_networks_keep_the_config_hashable_and_readable_by_name():
    assert hash(TWO_TE) == hash(TWO_TE.replace())
    assert TWO_TE.network("text_encoder_2").width == 48 and TWO_TE.network("unet") is TWO_TE.unet
    assert list(TWO_TE.networks) == ["text_encoder", "unet", "vae", "text_encoder_2"]
    with pytest.raises(ParameterError, match="no network 'text_encoder_2'"):
        TINY.network("text_encoder_2")
    with pytest.raises(ParameterError, match="extra_networks names must be distinct component names"):
        TINY.replace(extra_networks={"unet": TINY.unet})
    with pytest.raises(ParameterError, match=r"extra_networks\['x'\] must be a frozen config dataclass"):
        TINY.replace(extra_networks={"x": {"width": 3}})


def test_config_json_has_extra_networks_only_when_there_are_any(two_text_encoders):
    assert "extra_networks" not in json.loads(configs.config_to_json(TINY))
    text = configs.config_to_json(TWO_TE)
    assert json.loads(text)["extra_networks"]["text_encoder_2"]["width"] == 48
    assert configs.config_from_json(text, "t") == TWO_TE


def test_a_family_with_a_second_text_encoder_round_trips_a_diffusers_folder(tmp_path, two_text_encoders):
    """Its config.json and tokenizer folder are written and read by what the family's component declares."""
    model = Model.build(TWO_TE)
    states = {name: net.state_dict() for name, net in model.components.items()}
    folder = save_diffusers(tmp_path / "m", TWO_TE, states)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"] and index["text_encoder_2"][0] == "transformers"
    assert json.loads((folder / "text_encoder_2" / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((folder / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert read_folder_config(folder) == TWO_TE.replace(name="m")


def test_a_model_has_a_tokenizer_per_text_encoder_loaded_from_its_folder(tmp_path, two_text_encoders):
    built = Model.build(TWO_TE)
    assert list(built.tokenizers) == ["tokenizer", "tokenizer_2"] and built.tokenizer is built.tokenizers["tokenizer"]
    folder = built.save(tmp_path / "m")
    loaded = Model.load(folder)
    assert list(loaded.tokenizers) == ["tokenizer", "tokenizer_2"]
    pads = [t(["a"], max_length=8)[0, -1].item() for t in loaded.tokenizers.values()]
    assert pads == [49407, 0]  # tokenizer_2 pads with "!", as its text encoder's config says
    assert load_checkpoint(folder).tokenizer_dirs == {"tokenizer": folder / "tokenizer",
                                                      "tokenizer_2": folder / "tokenizer_2"}


def test_code_that_picks_networks_by_role_covers_every_text_encoder(tmp_path, two_text_encoders):
    """Cost, LoRA names, `sdlab info` and training iterate the family's text encoders."""
    one, two = cost_model(TINY).text_chunk, cost_model(TWO_TE).text_chunk
    second = sum(2.0 * 77 * m.weight.numel() for m in TextEncoder(TWO_TE.network("text_encoder_2")).modules()
                 if isinstance(m, torch.nn.Linear))
    assert two == one + second
    model = Model.build(TWO_TE)
    names = adaptable_modules(model)
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj" in names
    first_fc1 = model.text_encoder.text_model.encoder.layers[0].mlp.fc1
    assert names["lora_te_text_model_encoder_layers_0_mlp_fc1"] is first_fc1
    assert any(k.startswith("lora_te2_") for k in default_targets(model, text_encoder=True))
    assert not any(k.startswith("lora_te") for k in default_targets(model))
    info = describe_checkpoint(model.save(tmp_path / "m"), hash_files=False)
    assert info["text_encoders"] == ["text_encoder", "text_encoder_2"] and info["text_encoder_2"]["width"] == 48
    assert "text enc. 2: width 48, 2 layers" in format_info(info)


def test_sd1_lora_names_and_info_are_unchanged():
    model = Model.build(TINY)
    prefixes = {k.split("_text_model")[0] for k in default_targets(model, text_encoder=True) if "_text_model" in k}
    assert prefixes == {"lora_te"}


def test_training_the_text_encoder_trains_every_text_encoder_of_the_family(tmp_path, two_text_encoders):
    model = Model.build(TWO_TE)
    task = DiffusionTask(tiny_config(tmp_path, train_text_encoder=True), model)
    assert set(task.trained) == {"unet", "text_encoder", "text_encoder_2"} and set(task.frozen) == {"vae"}
    params = {n.split(".")[0] for n, p in task.objective.named_parameters() if p.requires_grad}
    assert {"text_encoder", "text_encoder_2"} <= params  # the objective holds both (DDP sees them)


def test_training_model_config_files_keep_extra_networks(tmp_path, two_text_encoders):
    values = model_config_to_dict(TWO_TE)
    assert values["extra_networks"]["text_encoder_2"]["width"] == 48
    assert model_config_from_dict(json.loads(json.dumps(values))) == TWO_TE
    assert "extra_networks" not in model_config_to_dict(TINY)
    with pytest.raises(ParameterError, match=r"extra_networks names components \['text_encoder_3'\]"):
        model_config_from_dict({**values, "extra_networks": {"text_encoder_3": {}}})
