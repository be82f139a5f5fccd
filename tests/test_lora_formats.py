"""LoRA file layouts: kohya/A1111 and diffusers/PEFT (LCM-LoRA, hub LoRAs), on each network of the family.

A tiny SD 1.x model with random weights is saved as a diffusers folder; random LoRAs are written in each
layout the way the tools write them (PEFT `lora_A`/`lora_B` with and without diffusers' LoraConfig
metadata, diffusers' older `lora.down`/`lora_linear_layer`/attention-processor names, kohya with and
without alphas). sdlab's merged weights must be W + weight * scale * B @ A with PEFT's scale, and, where
peft is installed (diffusers' `load_lora_weights` needs it), sdlab's UNet and text-encoder outputs and one
generated image must equal diffusers' with the same file loaded. Then the errors: a LoRA for another
architecture, keys for a network the model lacks, bad metadata, a file mixing layouts.
"""

import json
import logging

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdlab
from sdlab import families
from sdlab.config import TINY, TextEncoderConfig, UNetConfig
from sdlab.errors import CheckpointError
from sdlab.lora import METADATA_KEY, apply_lora, read_lora

RANK = 4
TOLERANCE = 1e-4  # fp32 outputs, sdlab vs diffusers
WEIGHT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
UNET_ENDINGS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_CONV = "down_blocks.0.resnets.0.conv1"  # a 3x3 conv: LoCon-style, PEFT adapts convs too
TEXT_ENDINGS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    sdlab.Model.build(TINY).save(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return sdlab.load(folder)


def targets(model) -> dict[str, dict[str, torch.nn.Module]]:
    """component -> module path -> layer: the layers the LoRAs here adapt (kohya's and PEFT's usual set)."""
    unet = {p: m for p, m in model.unet.named_modules() if p.endswith(UNET_ENDINGS) and ".attentions." in p}
    unet[UNET_CONV] = model.unet.get_submodule(UNET_CONV)
    text = {p: m for p, m in model.text_encoder.named_modules() if p.endswith(TEXT_ENDINGS)}
    return {"unet": unet, "text_encoder": text}


def random_updates(model, seed=1, ranks=None) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> path -> (A (r, in[, kh, kw]), B (out, r[, 1, 1])), random, of PEFT's shapes."""
    gen = torch.Generator().manual_seed(seed)
    updates = {}
    for component, layers in targets(model).items():
        updates[component] = {}
        for path, layer in layers.items():
            r = (ranks or {}).get(path, RANK)
            if isinstance(layer, torch.nn.Conv2d):
                a = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=gen)
                b = torch.randn(layer.out_channels, r, 1, 1, generator=gen)
            else:
                a, b = torch.randn(r, layer.in_features, generator=gen), torch.randn(layer.out_features, r, generator=gen)
            updates[component][path] = (0.1 * a, 0.1 * b)
    return updates


def _processor_name(component: str, path: str) -> str | None:
    """diffusers' attention-processor name of a module (`attn1.processor.to_q_lora`), where it has one."""
    unet = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    text = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    parent, _, leaf = path.rpartition(".")
    if path.endswith("to_out.0"):
        parent, leaf = path[: -len(".to_out.0")], "to_out.0"
    names = unet if component == "unet" else text
    if leaf not in names:
        return None
    return f"{parent}.processor.{names[leaf]}_lora" if component == "unet" else f"{parent}.{names[leaf]}_lora"


def layout(updates, style: str, alphas=None) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in one layout.

    peft: `unet.<path>.lora_A.weight` / `.lora_B.weight` (diffusers' save_lora_weights, LCM-LoRA);
    peft-flat: text encoder paths without `text_model.` (PEFT on transformers 5's CLIPTextModel);
    old: diffusers' LoRA layers before PEFT (UNet attention as processors `attn1.processor.to_q_lora.down`,
    other UNet layers `.lora.down`, text encoder attention `self_attn.to_q_lora.down`, its MLP
    `.lora_linear_layer.down`); kohya: `lora_unet_..._to_q.lora_down.weight` (+ `.alpha` from `alphas`).
    """
    prefixes = {c.name: c.lora_prefix for c in families.family_of(TINY).components.values() if c.lora_prefix}
    out = {}
    for component, modules in updates.items():
        for path, (a, b) in modules.items():
            if style == "kohya":
                name = prefixes[component] + path.replace(".", "_")
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
                if alphas and path in alphas.get(component, {}):
                    out[f"{name}.alpha"] = torch.tensor(alphas[component][path])
                continue
            if style in ("peft", "peft-flat"):
                shown = path.removeprefix("text_model.") if style == "peft-flat" else path
                down, up = f"{component}.{shown}.lora_A.weight", f"{component}.{shown}.lora_B.weight"
            elif (processor := _processor_name(component, path)) is not None:
                down, up = f"{component}.{processor}.down.weight", f"{component}.{processor}.up.weight"
            else:
                middle = "lora" if component == "unet" else "lora_linear_layer"
                down, up = f"{component}.{path}.{middle}.down.weight", f"{component}.{path}.{middle}.up.weight"
            out[down], out[up] = a, b
    return out


def save(tensors, folder, lora_configs=None):
    """Write a LoRA as diffusers does: the file, and each component's LoraConfig as "<component>.<field>"."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if lora_configs:
        packed = {f"{c}.{k}": v for c, config in lora_configs.items() for k, v in config.items()}
        metadata[METADATA_KEY] = json.dumps(packed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHT_FILE), metadata=metadata)
    return folder / WEIGHT_FILE


def lora_config(paths, r=RANK, lora_alpha=8, **extra):
    """A LoraConfig as training scripts give it: target modules by the tail of their names."""
    tails = sorted({".".join(path.split(".")[-2:]) for path in paths})
    return {"r": r, "lora_alpha": lora_alpha, "target_modules": tails, **extra}


def expected_weights(model, updates, scales, weight):
    """W + weight * scale * B @ A for each adapted layer, by component and path."""
    out = {}
    for component, modules in updates.items():
        network = getattr(model, component)
        for path, (a, b) in modules.items():
            w = network.get_submodule(path).weight.detach()
            delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
            out[component, path] = w + weight * scales[component][path] * delta
    return out


def uniform(updates, scale):
    return {c: {p: scale for p in modules} for c, modules in updates.items()}


# (layout, metadata/alpha kind): the cases each comparison runs. "kohya-mixed-alphas" (alphas that differ
# between modules, none on one) is checked against the weights only: diffusers (0.42) gives a kohya
# module without an alpha, and the attention projections whatever alpha they have, the file's most common
# alpha (its converted alpha names for attention, `attn1.processor.to_q_lora.down.weight`, match no
# module), where kohya's scripts and A1111 take each module's own alpha / rank (none: 1), as sdlab does.
CASES = ["peft", "peft-flat", "peft-config", "peft-rslora", "old", "kohya", "kohya-alphas"]
WEIGHT_CASES = [*CASES, "kohya-mixed-alphas"]


def case(model, name, tmp_path):
    """(file, updates, scale of each module) for one of CASES."""
    ranks = {"down_blocks.0.attentions.0.proj_in": 2} if name == "peft-config" else None
    updates = random_updates(model, seed=len(name), ranks=ranks)
    paths = {c: list(m) for c, m in updates.items()}
    scales = uniform(updates, 1.0)  # PEFT/diffusers without a LoraConfig, and kohya without alphas: 1
    configs, alphas = None, None
    if name == "peft-config":  # lora_alpha / r = 2, one module of rank 2 (rank_pattern), to_k's alpha 2
        configs = {c: lora_config(p, rank_pattern={"^down_blocks.0.attentions.0.proj_in": 2} if c == "unet" else {},
                                  alpha_pattern={"to_k": 2} if c == "unet" else {"fc1": 1}) for c, p in paths.items()}
        scales = uniform(updates, 8 / RANK)
        for path in updates["unet"]:
            if path.endswith("to_k"):
                scales["unet"][path] = 2 / RANK
        scales["unet"]["down_blocks.0.attentions.0.proj_in"] = 8 / 2
        for path in updates["text_encoder"]:
            if path.endswith("fc1"):
                scales["text_encoder"][path] = 1 / RANK
    elif name == "peft-rslora":  # the UNet's lora_alpha / sqrt(r), the text encoder's lora_alpha / r
        configs = {"unet": lora_config(paths["unet"], lora_alpha=3, use_rslora=True),
                   "text_encoder": lora_config(paths["text_encoder"], lora_alpha=2)}
        scales = {"unet": {p: 3 / RANK**0.5 for p in updates["unet"]},
                  "text_encoder": {p: 2 / RANK for p in updates["text_encoder"]}}
    elif name.startswith("kohya-"):  # alpha / rank (mixed: another alpha on every third module, none on one)
        mixed = name == "kohya-mixed-alphas"
        alphas = {c: {p: (1.0 if mixed and i % 3 == 0 else 2.0) for i, p in enumerate(m) if not (mixed and i == 1)}
                  for c, m in updates.items()}
        for c, m in updates.items():
            for p in m:
                scales[c][p] = alphas[c][p] / RANK if p in alphas[c] else 1.0
    style = {"peft-config": "peft", "peft-rslora": "peft", "kohya-alphas": "kohya", "kohya-mixed-alphas": "kohya"}.get(name, name)
    return save(layout(updates, style, alphas), tmp_path / name, configs), updates, scales


# --- the merged weights (no diffusers needed) -------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHT_CASES)
def test_each_layout_merges_with_its_scale(model, tmp_path, name):
    path, updates, scales = case(model, name, tmp_path)
    weight = 0.7
    expected = expected_weights(model, updates, scales, weight)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with apply_lora(model, path, weight) as handle:
        assert len(handle.applied) == sum(len(m) for m in updates.values()) and not handle.skipped
        for (component, module), want in expected.items():
            got = getattr(model, component).get_submodule(module).weight
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{name}: {component}.{module}")
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def test_layouts_name_the_same_modules(model, tmp_path):
    """Every layout of one LoRA reads as the same kohya-named modules with the same tensors."""
    updates = random_updates(model)
    read = {style: read_lora(layout(updates, style)) for style in ("kohya", "peft", "peft-flat", "old")}
    kohya = read.pop("kohya")
    for style, modules in read.items():
        names = {n.replace("lora_te_encoder_", "lora_te_text_model_encoder_") for n in modules}
        assert names == set(kohya), style
    for style in ("peft", "old"):
        for name, module in read[style].items():
            assert torch.equal(module.down, kohya[name].down) and torch.equal(module.up, kohya[name].up)
            assert module.alpha == kohya[name].alpha == RANK


def test_unprefixed_keys_are_the_unets(model):
    """Keys without a component name are the UNet's (as `unet.save_attn_procs` wrote them)."""
    updates = {"unet": random_updates(model)["unet"]}
    tensors = {k.removeprefix("unet."): v for k, v in layout(updates, "peft").items()}
    expected = expected_weights(model, updates, uniform(updates, 1.0), 1.0)
    with apply_lora(model, tensors) as handle:
        assert len(handle.applied) == len(updates["unet"])
        for (component, module), want in expected.items():
            torch.testing.assert_close(model.unet.get_submodule(module).weight, want, rtol=0, atol=1e-6)


# --- against diffusers ------------------------------------------------------------------------------------


def reference(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_in_diffusers(pipe, path, weight):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="test")
    if weight != 1:
        pipe.set_adapters(["test"], adapter_weights=[weight])


def network_inputs():
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500, 20]),
            torch.randn(2, 77, TINY.unet.context_dim, generator=gen), torch.randint(0, 49406, (2, 77), generator=gen))


@torch.no_grad()
def ours(model):
    x, t, context, ids = network_inputs()
    return model.unet(x, t, context), model.text_encoder(ids)


@torch.no_grad()
def theirs(pipe):
    x, t, context, ids = network_inputs()
    return pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("weight", [1.0, 0.6], ids=["weight-1", "weight-0.6"])
@pytest.mark.parametrize("name", CASES)
def test_outputs_match_diffusers(model, folder, tmp_path, name, weight):
    pipe = reference(folder)
    plain = ours(model)
    path, _, _ = case(model, name, tmp_path)
    load_in_diffusers(pipe, path, weight)
    with apply_lora(model, path, weight):
        unet, text = ours(model)
    their_unet, their_text = theirs(pipe)
    assert (unet - plain[0]).abs().max() > 1e-2 and (text - plain[1]).abs().max() > 1e-2  # the LoRA acts
    assert (unet - their_unet).abs().max() <= TOLERANCE, name
    assert (text - their_text).abs().max() <= TOLERANCE, name


def test_unprefixed_keys_match_diffusers_unet_loader(model, folder):
    """diffusers' pipeline loader reads only `unet.`-prefixed keys; its UNet's own loader (prefix=None)
    reads the unprefixed ones, and sdlab takes them as that does."""
    pytest.importorskip("peft", reason="diffusers' load_lora_adapter needs peft")
    pipe = reference(folder)
    updates = {"unet": random_updates(model, seed=7)["unet"]}
    tensors = {k.removeprefix("unet."): v for k, v in layout(updates, "peft").items()}
    pipe.unet.load_lora_adapter(dict(tensors), prefix=None, adapter_name="test")
    with apply_lora(model, tensors):
        unet, _ = ours(model)
    assert (unet - theirs(pipe)[0]).abs().max() <= TOLERANCE


def test_generated_image_matches_diffusers(model, folder, tmp_path):
    """One image through the usual generation path (GenerationParams.loras and a <lora:name:w> tag)."""
    path, _, _ = case(model, "peft-config", tmp_path)
    weight = 0.7
    pipe = reference(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    load_in_diffusers(pipe, path, weight)
    prompt, negative = "a red circle above a blue square", "blurry"
    call = dict(num_inference_steps=8, guidance_scale=3.0, height=64, width=64)
    expected = pipe(prompt, negative_prompt=negative, output_type="np",
                    generator=torch.Generator().manual_seed(3), **call).images[0]
    params = sdlab.GenerationParams(prompt=prompt, negative_prompt=negative, width=64, height=64, steps=8,
                                    sampler="Euler", schedule="automatic", cfg_scale=3.0, seed=0)
    plain = sdlab.generate(model, params, generator=torch.Generator().manual_seed(3)).images[0]
    by_param = sdlab.generate(model, params.replace(loras=((str(path), weight),)),
                              generator=torch.Generator().manual_seed(3)).images[0]
    by_tag = sdlab.generate(model, params.replace(prompt=f"{prompt} <lora:style:{weight}>"),
                            generator=torch.Generator().manual_seed(3), named_loras={"style": path}).images[0]
    got, want = np.asarray(by_param, dtype=np.int16), (expected * 255).round().astype(np.int16)
    assert want.std() > 10, "the reference image is flat: the comparison would prove nothing"
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 20  # the LoRA changes the picture
    assert np.abs(got - want).max() <= 2
    assert np.abs(np.asarray(by_tag, dtype=np.int16) - got).max() <= 2


# --- errors -----------------------------------------------------------------------------------------------


def other_architecture():
    """A tiny model of another shape: SD 2.x's family, a 48-wide text encoder (context) and UNet levels."""
    return sdlab.Model.build(TINY.replace(
        name="tiny-other", family="sd2", text_encoder=TextEncoderConfig(width=48, num_layers=3, num_heads=4, mlp_width=64,
                                                                        activation="gelu", pad_token_id=0),
        unet=UNetConfig(channels=(32, 64), attention_levels=(True, False), context_dim=48, num_heads=None,
                        head_dim=8, norm_groups=8, use_linear_projection=True)))


def test_a_lora_for_another_architecture_is_refused_unchanged(model, tmp_path, caplog):
    other = other_architecture()
    path, _, _ = case(model, "peft", tmp_path)
    before = {k: v.clone() for k, v in other.unet.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        apply_lora(other, path)
    message = str(info.value)
    assert str(path) in message and "is not for this model" in message and "another architecture" in message
    assert "32-wide text context" in message and "this model's, 48" in message
    assert "'tiny-other'" in message and families.get_family("sd2").label in message
    assert families.get_family("sd1").label in message  # the tiny SD 1.x preset has a 32-wide context
    assert all(torch.equal(v, before[k]) for k, v in other.unet.state_dict().items())


def test_keys_for_a_network_the_model_lacks_are_reported(model, tmp_path, caplog):
    updates = random_updates(model)
    tensors = layout({"unet": updates["unet"]}, "peft")
    second = {f"text_encoder_2.{k.removeprefix('text_encoder.')}": v for k, v in layout(
        {"text_encoder": updates["text_encoder"]}, "peft").items()}  # an SDXL LoRA's second encoder
    with caplog.at_level(logging.WARNING, logger="sdlab.lora"):
        with apply_lora(model, tensors | second) as handle:
            assert len(handle.applied) == len(updates["unet"])
            assert len(handle.skipped) == len(updates["text_encoder"])
    assert f"{len(updates['text_encoder'])} LoRA modules match no layer" in caplog.text
    assert "'text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj'" in caplog.text
    with pytest.raises(CheckpointError, match=r"none of its \d+ LoRA modules matches.*This model is 'tiny'"):
        apply_lora(model, second)


def test_bad_metadata_and_mixed_layouts_are_errors(model, tmp_path):
    updates = random_updates(model)
    tensors = layout(updates, "peft")
    path = save(tensors, tmp_path / "bad")
    save_file(tensors, str(path), metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=f"{METADATA_KEY} metadata .* is not valid JSON"):
        apply_lora(model, path)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps({"unet.lora_alpha": "<b>ocho</b>"})})
    with pytest.raises(CheckpointError, match="field unet.lora_alpha is not a number") as info:
        apply_lora(model, path)
    assert "ocho" not in str(info.value)  # never file content
    save(tensors, tmp_path / "bad", {"unet": lora_config(updates["unet"], r=8)})
    with pytest.raises(CheckpointError, match="has rank 4, but the file's lora_adapter_metadata .* gives rank 8"):
        apply_lora(model, path)
    kohya = layout({"unet": dict(list(updates["unet"].items())[:1])}, "kohya")
    with pytest.raises(CheckpointError, match="given twice .* mixes layouts"):
        apply_lora(model, tensors | kohya)


def test_odd_names_and_extra_parts_are_never_echoed(model, caplog):
    updates = {"unet": dict(list(random_updates(model)["unet"].items())[:2])}
    tensors = layout(updates, "peft")
    first = next(iter(updates["unet"]))
    tensors[f"unet.{first}.lora_magnitude_vector"] = torch.ones(1)  # DoRA: not applied, said so
    tensors["unet.<script>alert(1)</script>.lora_A.weight"] = torch.zeros(RANK, 8)
    with caplog.at_level(logging.WARNING, logger="sdlab.lora"):
        with apply_lora(model, tensors) as handle:
            assert len(handle.applied) == 2
    assert "lora_magnitude_vector" in caplog.text and "does not apply" in caplog.text
    assert "<script>" not in caplog.text and "a name with unusual characters" in caplog.text
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon's Tucker form (lora_mid): not read, said so
    tucker = {f"{conv}.lora_down.weight": torch.zeros(RANK, 32, 1, 1), f"{conv}.lora_mid.weight": torch.zeros(
        RANK, RANK, 3, 3), f"{conv}.lora_up.weight": torch.zeros(32, RANK, 1, 1)}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdlab.lora"):
        with apply_lora(model, tensors | tucker) as handle:
            assert conv not in handle.applied and len(handle.applied) == 2
    assert "2 entries are not plain LoRA" in caplog.text and repr(conv) in caplog.text
    with pytest.raises(CheckpointError, match="no kohya-format LoRA weights .* no diffusers/PEFT ones"):
        apply_lora(model, {"unet.<script>": torch.zeros(2)})
