"""The SDXL family on tiny configs: generation end to end, single-file round trips, detection and errors.
(Diffusers folders: test_sdxl_checkpoints.py.)"""

import numpy as np
import pytest
import torch

import sdlab
from sdlab import families
from sdlab.checkpoints import load_checkpoint
from sdlab.errors import CheckpointError
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.model import Model
from sdlab.params import GenerationParams


@pytest.mark.parametrize("config", [TINY_SDXL, TINY_SDXL_REFINER], ids=lambda c: c.name)
def test_tiny_sdxl_generates_and_round_trips_a_single_file(tmp_path, config):
    torch.manual_seed(0)
    model = Model.build(config)
    params = GenerationParams(prompt="a (red:1.2) circle", steps=2, seed=1, width=64, height=64)
    image = sdlab.generate(model, params).images[0]
    assert image.size == (64, 64)
    path = model.save(tmp_path / "m.safetensors", layout="single-file")
    loaded = Model.load(path)
    assert loaded.config.replace(name=config.name) == config
    for name, net in model.components.items():  # the weights come back bit for bit
        state, back = net.state_dict(), loaded.components[name].state_dict()
        assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    again = sdlab.generate(loaded, params).images[0]
    # The image may still differ by a level here and there: memory-mapped tensors sit at other alignments,
    # which can change the CPU kernels' summation order.
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(again, dtype=int)).max() <= 1


def test_single_file_detection_without_sdlab_metadata(tmp_path):
    """Read off the shapes alone (CLIP's text towers have 64-wide heads, so these encoders are 64 wide)."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    te = dataclasses.replace(TINY_SDXL.text_encoder, width=64, num_heads=1)
    te2 = dataclasses.replace(TINY_SDXL.network("text_encoder_2"), width=64, num_heads=1, projection_dim=64)
    unet = dataclasses.replace(TINY_SDXL.unet, context_dim=128, added_input_dim=64 + 6 * 256, added_time_dim=256,
                               head_dim=64, channels=(64, 64, 128), norm_groups=32)
    config = TINY_SDXL.replace(text_encoder=te, unet=unet, extra_networks={"text_encoder_2": te2})
    model = Model.build(config)
    path = model.save(tmp_path / "m.safetensors", layout="single-file")
    tensors = load_file(path)
    save_file(tensors, tmp_path / "plain.safetensors")
    ckpt = load_checkpoint(tmp_path / "plain.safetensors")
    assert ckpt.config.family == "sdxl" and ckpt.config.unet == unet
    assert ckpt.config.network("text_encoder_2") == te2 and ckpt.config.text_encoder == te
    assert ckpt.config.prediction == "epsilon"
    # v-prediction where the file's metadata says so (Stability's modelspec keys, as SDXL v-pred fine-tunes carry)
    save_file(tensors, tmp_path / "vpred.safetensors", metadata={"modelspec.prediction_type": "v"})
    assert load_checkpoint(tmp_path / "vpred.safetensors").config.prediction == "v_prediction"
    # the original .ckpt form (a torch zip with the weights under state_dict), read without running code
    torch.save({"state_dict": tensors, "global_step": 1}, tmp_path / "m.ckpt")
    assert load_checkpoint(tmp_path / "m.ckpt").config.unet == unet
    # an SDXL file missing one text encoder: one clear error naming what is missing
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")},
              tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match="without its second text encoder"):
        load_checkpoint(tmp_path / "half.safetensors")


def test_empty_negative_prompt_conditions_on_zeros():
    model = Model.build(TINY_SDXL)
    params = GenerationParams(prompt="a", negative_prompt="", steps=1, seed=0).resolved(model.config)
    cond, uncond = families.family_of(model.config).condition(model, ["a"], [""], params)
    assert uncond.context.abs().max() == 0 and uncond.added[:, :32].abs().max() == 0
    assert cond.added[0, 32:].tolist() == [64, 64, 0, 0, 64, 64]  # original size, crop, target size


def test_requests_on_sdxl_models_are_priced_with_the_added_embedding():
    """Server admission prices every request before running it: an SDXL UNet costs its SD-style body plus
    the two Linear layers of its added-condition MLP (2 FLOP per weight per sample)."""
    import dataclasses

    from sdlab.cost import cost_model

    u = TINY_SDXL.unet
    plain = dataclasses.replace(u, added_condition=None, added_input_dim=None)
    with_added, without = cost_model(TINY_SDXL).unet, cost_model(TINY_SDXL.replace(unet=plain)).unet
    mlp = 2 * (u.added_input_dim * u.time_embed_dim + u.time_embed_dim * u.time_embed_dim)
    assert with_added.flops(64) - without.flops(64) == pytest.approx(mlp)
    assert with_added.flops(256) - without.flops(256) == pytest.approx(mlp)


def test_long_weighted_prompt_by_hand():
    """A1111's prompt syntax with both encoders: a prompt of two 75-token chunks with emphasis gives, for each
    encoder, each chunk's raw penultimate layer scaled by its weights with the chunk's mean restored, the
    chunks joined along the tokens and the encoders along the features; the pooled vector is bigG's of the
    first chunk (its projected end-of-text state), as A1111 builds SDXL's conditioning."""
    from sdlab.prompts import stack_chunks, tokenize_weighted

    torch.manual_seed(0)
    model = Model.build(TINY_SDXL)
    prompt = "a (red:1.4) circle, [blue] square, " * 12  # ~100 tokens: two chunks
    params = GenerationParams(prompt=prompt, steps=1, seed=0).resolved(model.config)
    cond, _ = families.family_of(model.config).condition(model, [prompt], None, params)
    contexts, pooled = [], None
    for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        chunks = tokenize_weighted(model.tokenizers[tokenizer], prompt)
        assert len(chunks) == 2 and any(w != 1 for c in chunks for w in c.weights)
        ids, weights = stack_chunks(chunks)  # (2, 77)
        encoder = model.components[name]
        hidden = encoder.hidden_states(ids)[-2]  # (2, 77, D): the penultimate layer, before the final norm
        scaled = hidden * weights[..., None]
        scaled = scaled * (hidden.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
        contexts.append(scaled.reshape(1, 2 * 77, -1))
        pooled = encoder.encode(ids[:1])[1]  # (1, P)
    expected_context = torch.cat(contexts, dim=-1)
    assert cond.context.shape == (1, 154, TINY_SDXL.unet.context_dim)
    torch.testing.assert_close(cond.context, expected_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.added[:, : pooled.shape[1]], pooled, rtol=1e-5, atol=1e-5)
