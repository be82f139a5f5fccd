"""SDXL's second text encoder (OpenCLIP ViT-bigG/14 with its text projection) against
transformers.CLIPTextModelWithProjection, in fp32 on the CPU, on a tiny config of the same shape.

The reference gets seeded random weights (LayerNorm scales and biases perturbed so that a swapped or ignored
parameter shows up); its state dict loads strictly into sdlab's TextEncoder.
"""

import dataclasses

import pytest
import torch
from test_text_encoder import BOS, EOS, reference_config
from transformers import CLIPTextModelWithProjection

from sdlab.config import SD15, SD21, TextEncoderConfig
from sdlab.errors import ParameterError
from sdlab.nn.clip import TextEncoder, eos_positions

PAD = 0  # SDXL's second tokenizer pads with "!" (id 0)
LEGACY_EOS_TOKEN_ID = 2  # what SD/SDXL text encoder configs say; transformers then pools at the largest id
TOLERANCE = 1e-5

# bigG-shaped: exact GELU, "!" padding, a projection of another width than the model's (so a transposed
# weight cannot pass).
TINY_BIGG = TextEncoderConfig(
    width=32, num_layers=4, num_heads=4, mlp_width=128, activation="gelu", pad_token_id=PAD, projection_dim=24
)
FULL_BIGG = TextEncoderConfig(
    width=1280, num_layers=32, num_heads=20, mlp_width=5120, activation="gelu", pad_token_id=PAD,
    projection_dim=1280,
)  # fmt: skip
FULL_BIGG_PARAMETERS = 694_659_840


@torch.no_grad()
def make_pair(cfg: TextEncoderConfig, eos_token_id: int = LEGACY_EOS_TOKEN_ID, attn_implementation="eager"):
    """A seeded random reference and an sdlab TextEncoder loaded strictly from its state dict."""
    torch.manual_seed(0)
    reference = CLIPTextModelWithProjection(reference_config(cfg, attn_implementation, eos_token_id=eos_token_id)).eval()
    for name, param in reference.named_parameters():
        if "layer_norm" in name or name.endswith("bias"):  # initialised to 1 and 0: make them tell apart
            param.add_(0.1 * torch.randn_like(param))
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def prompt_batch(length: int = 77) -> torch.Tensor:
    """Three prompts with the end token at different positions, padded with "!" after it."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for words in (3, 9, length - 2):
        tokens = torch.randint(1, 49000, (words,), generator=generator).tolist()
        ids = [BOS, *tokens, EOS]
        rows.append(ids + [PAD] * (length - len(ids)))
    return torch.tensor(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- the layout ---------------------------------------------------------------------------------------------


def test_state_dict_has_the_layout_of_clip_text_model_with_projection():
    reference, ours = make_pair(TINY_BIGG)
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert ours.text_projection.weight.shape == (TINY_BIGG.projection_dim, TINY_BIGG.width)
    assert ours.text_projection.bias is None


def test_sd1_and_sd2_text_encoders_have_no_projection():
    for cfg in (SD15.text_encoder, SD21.text_encoder):
        assert cfg.projection_dim is None and cfg.eos_token_id is None
    keys = TextEncoder(TextEncoderConfig(width=8, num_layers=1, num_heads=2, mlp_width=16)).state_dict()
    assert not any(key.startswith("text_projection") for key in keys)


# -- numerical parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", [77, 20])
def test_hidden_states_and_text_embeds_match_reference(attn_implementation, length):
    reference, ours = make_pair(TINY_BIGG, attn_implementation=attn_implementation)
    ids = prompt_batch(length)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden_states = ours.hidden_states(ids)
        penultimate, pooled = ours.encode(ids)

    assert len(hidden_states) == len(expected.hidden_states) == TINY_BIGG.num_layers + 1
    for i, (got, want) in enumerate(zip(hidden_states, expected.hidden_states)):
        assert max_diff(got, want) <= TOLERANCE, f"hidden state {i}"
    # What diffusers' SDXL pipeline takes: hidden_states[-2] (not final-LayerNormed) and text_embeds.
    assert penultimate.shape == (3, length, TINY_BIGG.width)
    assert max_diff(penultimate, expected.hidden_states[-2]) <= TOLERANCE
    assert pooled.shape == (3, TINY_BIGG.projection_dim)
    assert max_diff(pooled, expected.text_embeds) <= TOLERANCE


def test_encode_clip_skip_and_final_norm_agree_with_forward():
    reference, ours = make_pair(TINY_BIGG)
    ids = prompt_batch()
    with torch.no_grad():
        hidden_states = reference(ids, output_hidden_states=True).hidden_states
        _, pooled = ours.encode(ids)
        for clip_skip in range(1, TINY_BIGG.num_layers + 1):
            raw, same_pooled = ours.encode(ids, clip_skip=clip_skip)
            normed, _ = ours.encode(ids, clip_skip=clip_skip, final_layer_norm=True)
            assert max_diff(raw, hidden_states[-clip_skip]) <= TOLERANCE, f"clip_skip={clip_skip}"
            assert torch.equal(normed, ours(ids, clip_skip=clip_skip)), f"clip_skip={clip_skip}"
            assert torch.equal(same_pooled, pooled)  # always from the last layer


def test_pooled_output_without_a_projection_is_the_normed_eos_state():
    cfg = TextEncoderConfig(width=32, num_layers=2, num_heads=4, mlp_width=64, activation="gelu", pad_token_id=PAD)
    ours = TextEncoder(cfg).eval()
    ids = prompt_batch()
    with torch.no_grad():
        _, pooled = ours.encode(ids)
        last = ours(ids)
    assert torch.equal(pooled, last[torch.arange(3), torch.tensor([4, 10, 76])])


# -- where the pooled output is taken ------------------------------------------------------------------------


@pytest.mark.parametrize("eos_token_id", [LEGACY_EOS_TOKEN_ID, EOS], ids=["legacy-argmax", "first-eos"])
def test_both_eos_rules_match_reference(eos_token_id):
    # An id larger than <|endoftext|> (an added token) after the end tells the two rules apart: the legacy
    # one pools there, the other at the end token. Each must match what transformers does for its config.
    rule = None if eos_token_id == LEGACY_EOS_TOKEN_ID else EOS
    cfg = dataclasses.replace(TINY_BIGG, vocab_size=EOS + 2, eos_token_id=rule)
    reference, ours = make_pair(cfg, eos_token_id)
    ids = prompt_batch(12)  # end tokens at 4, 10, 11
    ids[1, 11] = EOS + 1
    with torch.no_grad():
        expected = reference(ids).text_embeds
        _, pooled = ours.encode(ids)
    assert eos_positions(ids, rule).tolist() == ([4, 11, 11] if rule is None else [4, 10, 11])
    assert max_diff(pooled, expected) <= TOLERANCE


def test_eos_positions_rules():
    ids = torch.tensor([
        [BOS, 5, EOS, PAD, PAD, PAD],  # "!"-padded (SD 2.x, SDXL's second tokenizer)
        [BOS, 5, 6, 7, EOS, EOS],  # <|endoftext|>-padded (SD 1.x, SDXL's first tokenizer)
        [BOS, EOS, PAD, EOS + 1, PAD, PAD],  # an added token with a larger id after the end
    ])  # fmt: skip
    assert eos_positions(ids, None).tolist() == [2, 4, 3]  # the first largest id
    assert eos_positions(ids, EOS).tolist() == [2, 4, 1]  # the first end token


def test_config_checks_the_new_fields():
    with pytest.raises(ParameterError, match="projection_dim"):
        TextEncoderConfig(projection_dim=0)
    with pytest.raises(ParameterError, match="projection_dim"):
        TextEncoderConfig(projection_dim=True)
    with pytest.raises(ParameterError, match="eos_token_id"):
        TextEncoderConfig(eos_token_id=49408)
    with pytest.raises(ParameterError, match="eos_token_id"):
        TextEncoderConfig(eos_token_id="2")


# -- the full size, without weights --------------------------------------------------------------------------


@pytest.mark.slow
def test_full_bigg_parameter_count_matches_reference_on_meta():
    with torch.device("meta"):
        ours = TextEncoder(FULL_BIGG)
        reference = CLIPTextModelWithProjection(reference_config(FULL_BIGG, "sdpa", eos_token_id=LEGACY_EOS_TOKEN_ID))
    assert all(p.device.type == "meta" for p in ours.parameters())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == FULL_BIGG_PARAMETERS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_sd_configs_are_saved_as_before_the_pooling_fields_existed():
    """Files that SD 1.x/2.x configs are saved to keep exactly their text encoder fields (older sdlab versions
    read them), and read back to the same config."""
    import json

    from sdlab.checkpoints.configs import config_from_json, config_to_json
    from sdlab.config import PRESETS
    from sdlab.train.config import model_config_from_dict, model_config_to_dict

    for config in [c for c in PRESETS.values() if not c.family.startswith("sdxl")]:
        saved = json.loads(config_to_json(config))["text_encoder"]
        assert "projection_dim" not in saved and "eos_token_id" not in saved
        assert "projection_dim" not in model_config_to_dict(config)["text_encoder"]
        assert config_from_json(config_to_json(config), "test") == config
        assert model_config_from_dict(model_config_to_dict(config)) == config
