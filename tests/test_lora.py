"""LoRA: kohya/A1111 files (diffusers- and LDM-named, Linear, 1x1 and 3x3 conv, text encoder) merge as
W + weight * alpha / rank * up @ down and unmerge exactly; trained adapters save in that format and give,
merged, what they gave as hooks. All of it holds on `sdlab.perf.optimize`d models too (packed weights)."""

import copy
import logging
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdlab
from sdlab import perf
from sdlab.config import SD15, TINY
from sdlab.errors import CheckpointError
from sdlab.lora import (
    adaptable_modules,
    apply_lora,
    default_targets,
    inject_lora,
    read_lora,
)
from sdlab.model import Model
from sdlab.nn.clip import TextEncoder
from sdlab.nn.unet import UNet

RANK = 4
# kohya name -> the module it must land on (TINY: 2 levels, 2 layers per block, attention at level 0)
HAND_MADE = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "lora_unet_input_blocks_1_1_proj_out": "unet.down_blocks.0.attentions.0.proj_out",  # LDM name, 1x1 conv
    "lora_unet_input_blocks_2_1_transformer_blocks_0_ff_net_2": "unet.down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0": "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "lora_unet_down_blocks_0_resnets_0_conv1": "unet.down_blocks.0.resnets.0.conv1",  # 3x3 conv (LoCon)
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_2_mlp_fc1": "text_encoder.text_model.encoder.layers.2.mlp.fc1",
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model.build(TINY)


def module_of(model, path):
    network, _, rest = path.partition(".")
    return getattr(model, network).get_submodule(rest)


def hand_made_lora(model, dtype=torch.float16, seed=1):
    """A LoRA file as kohya's scripts write it: fp16 weights, alpha as a 0-d tensor, conv shapes for convs."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, path in HAND_MADE.items():
        layer = module_of(model, path)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=gen)
            up = torch.randn(layer.out_channels, RANK, 1, 1, generator=gen)
        else:
            down = torch.randn(RANK, layer.in_features, generator=gen)
            up = torch.randn(layer.out_features, RANK, generator=gen)
        tensors[f"{name}.lora_down.weight"] = (0.1 * down).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (0.1 * up).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(2.0, dtype=dtype)
    # a second text encoder's module (SDXL) that this model does not have
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(8, RANK)
    return tensors


def snapshot(model):
    return {f"{n}.{k}": v.clone() for n in ("unet", "text_encoder", "vae") for k, v in getattr(model, n).state_dict().items()}


def outputs(model):
    gen = torch.Generator().manual_seed(3)
    x, ids = torch.randn(1, 4, 8, 8, generator=gen), torch.randint(0, 1000, (1, 77), generator=gen)
    with torch.no_grad():
        context = model.text_encoder(ids)
        return context, model.unet(x.to(model.dtype), torch.tensor([500]), context)


def test_hand_made_kohya_file_merges_exactly_and_unmerges_bit_for_bit(model, tmp_path, caplog):
    tensors = hand_made_lora(model)
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    before = snapshot(model)
    context_before, out_before = outputs(model)
    weight = 0.8
    with caplog.at_level(logging.WARNING):
        handle = apply_lora(model, path, weight)
    assert sorted(handle.applied) == sorted(HAND_MADE)
    assert handle.skipped == ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    assert "match no layer" in caplog.text
    after = snapshot(model)
    changed = {f"{p}.weight" for p in HAND_MADE.values()}
    for name, value in after.items():
        if name not in changed:
            assert torch.equal(value, before[name]), name
    for kohya, path_ in HAND_MADE.items():
        down = tensors[f"{kohya}.lora_down.weight"].float()
        up = tensors[f"{kohya}.lora_up.weight"].float()
        w = before[f"{path_}.weight"]
        if down.ndim == 4 and down.shape[-1] == 3:  # 3x3 conv: (out, r) @ (r, in*9)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        expected = w + weight * (2.0 / RANK) * delta
        torch.testing.assert_close(after[f"{path_}.weight"], expected, rtol=0, atol=1e-6)
    context_after, out_after = outputs(model)
    assert (context_after - context_before).abs().max() > 1e-4
    assert (out_after - out_before).abs().max() > 1e-4
    handle.unmerge()
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name
    context_back, out_back = outputs(model)
    assert torch.equal(out_back, out_before) and torch.equal(context_back, context_before)


def test_merged_output_equals_a_network_with_hand_updated_weights(model):
    tensors = hand_made_lora(model, dtype=torch.float32)
    reference = Model.build(TINY)
    for net in ("unet", "text_encoder", "vae"):
        getattr(reference, net).load_state_dict(getattr(model, net).state_dict())
    with torch.no_grad():
        for kohya, path in HAND_MADE.items():
            layer = module_of(reference, path)
            down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
            layer.weight += 0.5 * (2.0 / RANK) * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    with apply_lora(model, tensors, 0.5):
        merged = outputs(model)
    expected = outputs(reference)
    torch.testing.assert_close(merged[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[1], expected[1], rtol=0, atol=1e-5)


def test_ldm_names_cover_sd15_transformers():
    with torch.device("meta"):
        fake = types.SimpleNamespace(config=SD15, unet=UNet(SD15.unet), text_encoder=TextEncoder(SD15.text_encoder))
    layers = adaptable_modules(fake)
    pairs = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_proj_in": "down_blocks.2.attentions.1.proj_in",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    }
    for kohya, path in pairs.items():
        assert layers[kohya] is fake.unet.get_submodule(path), kohya
    # every default training target of SD 1.5 also has its LDM-named alias
    targets = default_targets(fake, text_encoder=True)
    # kohya's SD 1.5 LoRA: 16 transformers x (proj_in/out + 8 attention + 2 ff) = 192, 12 text layers x 6 = 72
    assert len(targets) == 16 * 12 + 12 * 6 == 264
    ldm_words = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")
    aliases = {id(m) for k, m in layers.items() if k.startswith(ldm_words)}
    assert all(id(m) in aliases for k, m in targets.items() if k.startswith("lora_unet_"))


def test_trained_adapters_save_in_kohya_format_and_merge_to_the_same_output(model, tmp_path):
    _, before_out = outputs(model)
    network = inject_lora(model, rank=2, alpha=1.0, text_encoder=True)
    try:
        hooked_start = outputs(model)
        assert torch.equal(hooked_start[1], before_out)  # up starts at zero: no change
        with torch.no_grad():
            for adapter in network.adapters.values():
                adapter.lora_up.weight.normal_(0, 0.05)
        hooked = outputs(model)
        path = network.save(tmp_path / "trained.safetensors")
    finally:
        network.detach()
    state = read_lora(path)
    some = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert some in state and state[some].alpha == 1.0 and state[some].rank == 2
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in state
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in state
    assert torch.equal(outputs(model)[1], before_out)  # detached: hooks gone
    with apply_lora(model, path, 1.0):
        merged = outputs(model)
    torch.testing.assert_close(merged[0], hooked[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[1], hooked[1], rtol=0, atol=1e-5)


def test_errors_name_the_problem(model, tmp_path):
    with pytest.raises(CheckpointError, match="no kohya-format LoRA"):
        apply_lora(model, {"something.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="none of its"):
        apply_lora(model, {"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
                           "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)})
    bad = "lora_unet_down_blocks_0_attentions_0_proj_in"
    with pytest.raises(CheckpointError, match=bad):
        apply_lora(model, {f"{bad}.lora_down.weight": torch.zeros(2, 5), f"{bad}.lora_up.weight": torch.zeros(32, 2)})


# --- the fast path: merging into sdlab.perf's packed layers -----------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")
BUILTIN_PARAMS = sdlab.GenerationParams(prompt="a red circle above a blue square", width=48, height=48, steps=3,
                                        seed=3)


@pytest.fixture(scope="module")
def builtin():
    return sdlab.Model.from_name("builtin")


@pytest.fixture(scope="module")
def packed_builtin(builtin):
    return perf.optimize(copy.deepcopy(builtin))


@pytest.fixture(scope="module")
def random_builtin_lora(builtin, tmp_path_factory):
    """A rank-4 LoRA for the built-in model with random non-zero up weights (a fresh one changes nothing)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        network = inject_lora(builtin, rank=4)
        network.detach()
        with torch.no_grad():
            for adapter in network.adapters.values():
                adapter.lora_up.weight.normal_(0, 0.5)
    return network.save(tmp_path_factory.mktemp("lora") / "random.safetensors")


def generated(model, params):
    result = sdlab.generate(model, params)
    return np.asarray(result.images[0], dtype=np.int16), result.latents


@needs_onednn
@pytest.mark.parametrize("speedup", [{}, {"deepcache": 2}, {"token_merging": 0.5}], ids=["plain", "deepcache", "tome"])
def test_lora_changes_the_packed_models_image_as_on_the_plain_model(builtin, packed_builtin, random_builtin_lora,
                                                                     speedup):
    params = BUILTIN_PARAMS.replace(**speedup)
    plain, _ = generated(builtin, params)
    with apply_lora(builtin, random_builtin_lora):
        plain_lora, plain_lora_latents = generated(builtin, params)
    assert np.abs(plain_lora - plain).max() > 50  # the LoRA changes the picture
    before, _ = generated(packed_builtin, params)
    state = snapshot(packed_builtin)
    with apply_lora(packed_builtin, random_builtin_lora):
        packed_lora, packed_lora_latents = generated(packed_builtin, params)
    # the same change as on the plain model, to float rounding (it used to be none at all)
    assert np.abs(packed_lora - plain_lora).max() <= 1
    torch.testing.assert_close(packed_lora_latents, plain_lora_latents, rtol=0, atol=1e-3)
    after, _ = generated(packed_builtin, params)
    assert np.array_equal(after, before)  # unmerged: exactly the image from before the merge
    assert all(torch.equal(value, state[name]) for name, value in snapshot(packed_builtin).items())


@needs_onednn
@pytest.mark.parametrize("packed_yet", [False, True], ids=["packs-at-first-call", "packed"])
def test_packed_model_merges_as_the_plain_one_and_unmerges_bit_for_bit(model, packed_yet):
    tensors = hand_made_lora(model, dtype=torch.float32)
    fast = perf.optimize(copy.deepcopy(model))
    to_q = module_of(fast, HAND_MADE["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"])
    conv = module_of(fast, HAND_MADE["lora_unet_down_blocks_0_resnets_0_conv1"])
    before_out = outputs(fast) if packed_yet else None
    assert isinstance(to_q, perf.PackedLinear) and (to_q.packed is not None) == packed_yet
    assert isinstance(conv, perf.PackedConv2d) and (conv.packed is not None) == packed_yet
    before = snapshot(fast)
    with apply_lora(model, tensors, 0.8):
        expected = outputs(model)
    with apply_lora(fast, tensors, 0.8):
        merged = outputs(fast)
        assert to_q.packed is not None and conv.packed is not None  # the merged weights run packed
    torch.testing.assert_close(merged[1], expected[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[0], expected[0], rtol=0, atol=1e-5)
    after = snapshot(fast)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    if packed_yet:
        assert all(torch.equal(a, b) for a, b in zip(outputs(fast), before_out))


@needs_onednn
def test_bf16_packed_model_merges_in_fp32_and_rounds_once(model):
    tensors = hand_made_lora(model, dtype=torch.float32)
    fast = perf.optimize(copy.deepcopy(model), dtype=torch.bfloat16)
    outputs(fast)  # packs the UNet's layers
    assert module_of(fast, "unet.down_blocks.0.attentions.0.proj_in").packed is not None
    before = snapshot(fast)
    with apply_lora(fast, tensors, 0.8):
        merged = snapshot(fast)
        outputs(fast)
    for kohya, path in HAND_MADE.items():
        w = before[f"{path}.weight"]
        up, down = tensors[f"{kohya}.lora_up.weight"], tensors[f"{kohya}.lora_down.weight"]
        delta = (2.0 / RANK) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        assert torch.equal(merged[f"{path}.weight"], (w.float() + 0.8 * delta).to(torch.bfloat16)), path
    assert all(torch.equal(value, before[name]) for name, value in snapshot(fast).items())


@needs_onednn
def test_stacked_loras_on_a_packed_model_unmerge_in_reverse_bit_for_bit(model):
    first, second = hand_made_lora(model, torch.float32, seed=1), hand_made_lora(model, torch.float32, seed=2)
    fast = perf.optimize(copy.deepcopy(model))
    states, outs = [snapshot(fast)], [outputs(fast)]
    handles = [apply_lora(fast, first, 0.7)]
    states.append(snapshot(fast)), outs.append(outputs(fast))
    handles.append(apply_lora(fast, second, -0.4))
    proj_in = "unet.down_blocks.0.attentions.0.proj_in.weight"  # a packed layer: each merge changes it
    assert not torch.equal(states[1][proj_in], states[0][proj_in])
    assert not torch.equal(snapshot(fast)[proj_in], states[1][proj_in])
    for handle, state, out in zip(reversed(handles), reversed(states), reversed(outs)):
        handle.unmerge()
        assert all(torch.equal(value, state[name]) for name, value in snapshot(fast).items())
        assert all(torch.equal(a, b) for a, b in zip(outputs(fast), out))


def test_a_failed_merge_leaves_the_model_as_it_was(model):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {k: v for k, v in hand_made_lora(model).items() if k.startswith(good)}
    tensors |= {f"{bad}.lora_down.weight": torch.zeros(2, 5), f"{bad}.lora_up.weight": torch.zeros(32, 2)}
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=bad):
        apply_lora(model, tensors)
    assert all(torch.equal(value, before[name]) for name, value in snapshot(model).items())


@needs_onednn
def test_training_hooks_work_on_an_optimized_model(model):
    """inject_lora's forward hooks on packed layers: the same outputs, and gradients reach the adapters
    (with gradients on, packed layers run the plain op on their unpacked weight)."""
    results = []
    for net in (copy.deepcopy(model), perf.optimize(copy.deepcopy(model))):
        torch.manual_seed(5)
        network = inject_lora(net, rank=2)
        with torch.no_grad():
            for adapter in network.adapters.values():
                adapter.lora_up.weight.normal_(0, 0.5)
        hooked = outputs(net)[1]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        net.unet(x, torch.tensor([500]), outputs(net)[0]).square().mean().backward()
        results.append((hooked, [a.lora_down.weight.grad for a in network.adapters.values()]))
        network.detach()
    (plain, plain_grads), (fast, fast_grads) = results
    assert (plain - outputs(model)[1]).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert all(g is not None for g in fast_grads)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_a_compiled_unet_takes_loras_into_its_own_layers(model):
    """torch.compile wraps the UNet (`_orig_mod`); its layers keep their names (and, measured, a compiled
    UNet with frozen weights follows in-place weight changes). A stand-in for the wrapper: compiling is slow."""

    class Compiled(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self._orig_mod = unet

    wrapped = types.SimpleNamespace(config=model.config, unet=Compiled(model.unet), text_encoder=model.text_encoder)
    assert adaptable_modules(wrapped) == adaptable_modules(model)
