"""sdlab.nn.clip.TextEncoder against transformers.CLIPTextModel (the reference), in fp32 on the CPU.

Both models get the same random weights (the reference's state dict, loaded strictly into ours), with
LayerNorm scales and all biases perturbed so that a swapped or ignored parameter shows up.
"""

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdlab.config import SD15, SD21, TINY, TextEncoderConfig
from sdlab.errors import ParameterError
from sdlab.nn.clip import TextEncoder

BOS, EOS = 49406, 49407
TOLERANCE = 1e-4

# SD 1.x style (OpenAI CLIP, quick-GELU, pads with <|endoftext|>) and SD 2.x style (OpenCLIP, GELU, pads
# with 0).
TINY_OPENAI = TINY.text_encoder
TINY_OPENCLIP = TextEncoderConfig(
    width=32, num_layers=4, num_heads=4, mlp_width=64, activation="gelu", pad_token_id=0
)
TINY_CONFIGS = pytest.mark.parametrize("cfg", [TINY_OPENAI, TINY_OPENCLIP], ids=["openai", "openclip"])


def reference_config(cfg: TextEncoderConfig, attn_implementation: str = "eager", *,
                     eos_token_id: int = EOS) -> CLIPTextConfig:
    """The transformers config of a text encoder equivalent to `cfg` (its projection, where `cfg` has one,
    is CLIPTextModelWithProjection's)."""
    projection = {} if cfg.projection_dim is None else {"projection_dim": cfg.projection_dim}
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        pad_token_id=cfg.pad_token_id,
        **projection,
    )
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def make_pair(cfg: TextEncoderConfig, attn_implementation: str = "eager"):
    """A randomly initialised reference model and an sdlab TextEncoder holding the same weights."""
    reference = CLIPTextModel(reference_config(cfg, attn_implementation)).eval()
    for name, param in reference.named_parameters():
        if "layer_norm" in name or name.endswith("bias"):  # initialised to 1 and 0: make them tell apart
            param.add_(0.1 * torch.randn_like(param))
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(diffusers_layout(reference), strict=True)
    return reference, ours


def diffusers_layout(reference: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The reference's weights under the names of published SD `text_encoder/` files.

    transformers >= 5 flattened CLIPTextModel: its own state dict lacks the `text_model.` prefix that
    transformers 4 (and so every published SD checkpoint) has.
    """
    return {"text_model." + key: value for key, value in reference.state_dict().items()}


def prompt_ids(cfg: TextEncoderConfig, words: list[int], length: int) -> list[int]:
    """<|startoftext|> words <|endoftext|>, padded with the config's pad token up to `length`."""
    ids = [BOS, *words, EOS]
    return ids + [cfg.pad_token_id] * (length - len(ids))


def prompt_batch(cfg: TextEncoderConfig, length: int) -> torch.Tensor:
    """Two prompts with the end token mid-sequence and padding after it, as SD's tokenizers produce."""
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(0, 49000, (length,), generator=generator).tolist()
    return torch.tensor([prompt_ids(cfg, words[:3], length), prompt_ids(cfg, words[3 : length // 2], length)])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- numerical parity ---------------------------------------------------------------------------------------


@TINY_CONFIGS
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", [77, 12])
def test_hidden_states_match_reference(cfg, attn_implementation, length):
    reference, ours = make_pair(cfg, attn_implementation)
    ids = prompt_batch(cfg, length)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden = ours.hidden_states(ids)
        last = ours(ids)

    assert len(hidden) == len(expected.hidden_states) == cfg.num_layers + 1
    for i, (got, want) in enumerate(zip(hidden, expected.hidden_states)):
        assert got.shape == want.shape == (2, length, cfg.width)
        assert max_diff(got, want) <= TOLERANCE, f"hidden state {i}"
    assert max_diff(last, expected.last_hidden_state) <= TOLERANCE


@TINY_CONFIGS
def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(cfg):
    reference, ours = make_pair(cfg)
    ids = prompt_batch(cfg, 77)
    with torch.no_grad():
        hidden_states = reference(ids, output_hidden_states=True).hidden_states
        final_norm = reference.final_layer_norm
        for clip_skip in range(1, cfg.num_layers + 1):
            expected = final_norm(hidden_states[-clip_skip])
            assert max_diff(ours(ids, clip_skip=clip_skip), expected) <= TOLERANCE, f"clip_skip={clip_skip}"


def test_clip_skip_outputs_differ_from_each_other():
    _, ours = make_pair(TINY_OPENAI)
    ids = prompt_batch(TINY_OPENAI, 20)
    with torch.no_grad():
        outputs = [ours(ids, clip_skip=s) for s in (1, 2, 3)]
    assert max_diff(outputs[0], outputs[1]) > 1e-2
    assert max_diff(outputs[1], outputs[2]) > 1e-2


def test_attention_is_causal():
    # Changing a later token must leave the context of every earlier token untouched.
    _, ours = make_pair(TINY_OPENAI)
    ids = prompt_batch(TINY_OPENAI, 30)
    changed = ids.clone()
    changed[:, 10] = 1234
    with torch.no_grad():
        before, after = ours(ids), ours(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert max_diff(before[:, 10:], after[:, 10:]) > 1e-3


def test_bfloat16_stays_close_to_float32():
    # SD often runs the text encoder in half precision; the module must keep working in it.
    _, ours = make_pair(TINY_OPENCLIP)
    ids = prompt_batch(TINY_OPENCLIP, 77)
    with torch.no_grad():
        full = ours(ids, clip_skip=2)
        half = ours.to(torch.bfloat16)(ids, clip_skip=2)
    assert half.dtype == torch.bfloat16
    assert max_diff(half.float(), full) <= 0.05 * full.abs().max().item()


def test_forward_skips_the_layers_clip_skip_does_not_need():
    _, ours = make_pair(TINY_OPENCLIP)  # 4 layers
    calls = []
    for i, layer in enumerate(ours.text_model.encoder.layers):
        layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
    with torch.no_grad():
        ours(prompt_batch(TINY_OPENCLIP, 8), clip_skip=2)
    assert calls == [0, 1, 2]


# -- state dict layout --------------------------------------------------------------------------------------


@TINY_CONFIGS
def test_state_dict_keys_and_shapes_equal_the_diffusers_layout(cfg):
    reference = CLIPTextModel(reference_config(cfg))
    expected = {key: tuple(value.shape) for key, value in diffusers_layout(reference).items()}
    got = {key: tuple(value.shape) for key, value in TextEncoder(cfg).state_dict().items()}
    assert got == expected
    assert f"text_model.encoder.layers.{cfg.num_layers - 1}.self_attn.q_proj.weight" in got
    assert not any("position_ids" in key for key in got)  # non-persistent in transformers >= 4.31 too


def test_loads_what_transformers_5_saves(tmp_path):
    # transformers >= 5 writes the keys without `text_model.`: a diffusers folder saved today looks like this.
    reference, ours = make_pair(TINY_OPENCLIP)
    reference.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "embeddings.token_embedding.weight" in saved
    fresh = TextEncoder(TINY_OPENCLIP)
    fresh.load_state_dict(saved, strict=True)
    ids = prompt_batch(TINY_OPENCLIP, 77)
    with torch.no_grad():
        assert torch.equal(fresh(ids), ours(ids))


def test_legacy_position_ids_are_accepted_and_ignored(caplog):
    # transformers < 4.31 saved `position_ids` as a persistent (1, 77) int64 buffer (e.g. SD 1.5's files).
    reference, ours = make_pair(TINY_OPENAI)
    state = diffusers_layout(reference)
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    fresh = TextEncoder(TINY_OPENAI)
    with caplog.at_level(logging.WARNING, logger="sdlab.nn.clip"):
        fresh.load_state_dict(state, strict=True)
    assert not caplog.records
    ids = prompt_batch(TINY_OPENAI, 77)
    with torch.no_grad():
        assert torch.equal(fresh(ids), ours(ids))


def test_corrupted_position_ids_are_ignored_with_a_warning(caplog):
    # Some merged SD 1.x checkpoints store float position ids like 76.9999; positions stay 0..T-1.
    reference, ours = make_pair(TINY_OPENAI)
    state = diffusers_layout(reference)
    state["text_model.embeddings.position_ids"] = torch.arange(77.0).unsqueeze(0) - 1e-4
    fresh = TextEncoder(TINY_OPENAI)
    with caplog.at_level(logging.WARNING, logger="sdlab.nn.clip"):
        fresh.load_state_dict(state, strict=True)
    assert "position_ids" in caplog.text
    ids = prompt_batch(TINY_OPENAI, 77)
    with torch.no_grad():
        assert torch.equal(fresh(ids), ours(ids))


def test_both_key_layouts_at_once_is_an_error():
    reference = CLIPTextModel(reference_config(TINY_OPENAI))
    state = {**diffusers_layout(reference), "final_layer_norm.bias": torch.zeros(TINY_OPENAI.width)}
    with pytest.raises(RuntimeError, match='Unexpected key.*"final_layer_norm.bias"'):
        TextEncoder(TINY_OPENAI).load_state_dict(state, strict=True)


def test_strict_loading_still_reports_missing_and_unexpected_keys():
    state = TextEncoder(TINY_OPENAI).state_dict()
    del state["text_model.final_layer_norm.bias"]
    state["text_model.surprise"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="final_layer_norm.bias") as info:
        TextEncoder(TINY_OPENAI).load_state_dict(state, strict=True)
    assert "text_model.surprise" in str(info.value)


def test_loads_onto_the_meta_device_with_assign():
    reference = CLIPTextModel(reference_config(TINY_OPENAI))
    state = diffusers_layout(reference)
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    with torch.device("meta"):
        ours = TextEncoder(TINY_OPENAI)
    ours.load_state_dict(state, strict=True, assign=True)
    assert ours.text_model.final_layer_norm.weight.device.type == "cpu"


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [0, 4, -1, 1.0, True])
def test_clip_skip_out_of_range_is_a_parameter_error(clip_skip):
    encoder = TextEncoder(TINY_OPENAI)  # 3 layers
    with pytest.raises(ParameterError, match=r"clip_skip.*from 1 .* to 3"):
        encoder(torch.zeros(1, 5, dtype=torch.long), clip_skip=clip_skip)


def test_too_many_tokens_is_a_parameter_error():
    encoder = TextEncoder(TINY_OPENAI)
    with pytest.raises(ParameterError, match="78 tokens.*1 to 77"):
        encoder(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ParameterError, match="78 tokens"):
        encoder.hidden_states(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.zeros(5, dtype=torch.long), r"shape \(batch, tokens\)"),
        (torch.zeros(1, 5), "int64"),
        (torch.zeros(1, 5, dtype=torch.bool), "int64"),
        (torch.zeros(1, 0, dtype=torch.long), "0 tokens"),
        (torch.tensor([[0, 49408]]), "0..49407"),
        (torch.tensor([[-1, 3]]), "0..49407"),
        ([[1, 2, 3]], "torch.Tensor"),
    ],
)
def test_malformed_input_ids_are_a_parameter_error(input_ids, message):
    with pytest.raises(ParameterError, match=message):
        TextEncoder(TINY_OPENAI)(input_ids)


def test_inconsistent_config_is_a_parameter_error():
    with pytest.raises(ParameterError, match="num_heads"):
        TextEncoder(dataclasses.replace(TINY_OPENAI, num_heads=5))


# -- full size (slow) ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SD15.text_encoder, SD21.text_encoder], ids=["sd15-vit-l", "sd2-vit-h"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_size_text_encoders_match_reference(cfg, attn_implementation):
    reference, ours = make_pair(cfg, attn_implementation)
    ids = prompt_batch(cfg, 77)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden = ours.hidden_states(ids)
        contexts = {skip: ours(ids, clip_skip=skip) for skip in (1, 2)}
        final_norm = reference.final_layer_norm
    diffs = [max_diff(got, want) for got, want in zip(hidden, expected.hidden_states)]
    scale = max(1.0, max(h.abs().max().item() for h in expected.hidden_states))
    print(f"\n{cfg.width}x{cfg.num_layers} vs {attn_implementation}: max|hidden| {scale:.3g}, "
          f"max diff over hidden states {max(diffs):.3g}")
    assert max(diffs) <= TOLERANCE * scale
    for skip, context in contexts.items():
        diff = max_diff(context, final_norm(expected.hidden_states[-skip]))
        print(f"clip_skip={skip}: max diff {diff:.3g}")
        assert diff <= TOLERANCE
