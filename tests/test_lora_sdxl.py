"""LoRA on SDXL: the kohya/A1111 layout (`lora_unet_`, `lora_te1_`, `lora_te2_`, UNet modules by their
diffusers or their original sgm names) and the diffusers/PEFT layout (`unet.`, `text_encoder.`,
`text_encoder_2.` incl. its `text_projection`), on the tiny SDXL base and refiner.

sdlab's merged weights must be W + weight * scale * B @ A (kohya: alpha / rank; PEFT: the LoraConfig's
lora_alpha / r), and, where peft is installed (diffusers' `load_lora_weights` needs it), equal to the
weights of diffusers' `StableDiffusionXLPipeline` after `load_lora_weights` + `fuse_lora` of the same file;
one generated image (through `GenerationParams.loras` and a `<lora:name:w>` tag) must equal diffusers'
with the LoRA loaded. A file PEFT and diffusers' `save_lora_weights` write themselves is read as diffusers
reads it. Then the refusals: an SD 1.x LoRA on SDXL and an SDXL LoRA on SD 1.x (and base vs refiner).
"""

import json

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_lora_formats import TEXT_ENDINGS, UNET_CONV, UNET_ENDINGS

import sdlab
from sdlab import families
from sdlab.config import TINY
from sdlab.errors import CheckpointError
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.lora import METADATA_KEY, apply_lora

RANK = 4
WEIGHT_FILE = "pytorch_lora_weights.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sdxl") / "model"
    sdlab.Model.build(TINY_SDXL).save(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return sdlab.load(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def targets(model, *, conv=True, projection=False) -> dict[str, dict[str, torch.nn.Module]]:
    """component -> module path -> layer: the layers kohya's and PEFT's usual SDXL LoRAs adapt (the UNet's
    transformer layers, both encoders' attention and MLP; optionally a 3x3 conv and bigG's projection)."""
    out = {"unet": {p: m for p, m in model.unet.named_modules() if p.endswith(UNET_ENDINGS) and ".attentions." in p}}
    if conv:
        out["unet"][UNET_CONV] = model.unet.get_submodule(UNET_CONV)
    for name in families.family_of(model.config).text_encoders:
        network = getattr(model, name)
        out[name] = {p: m for p, m in network.named_modules() if p.endswith(TEXT_ENDINGS)}
        if projection and name == "text_encoder_2":
            out[name]["text_projection"] = network.text_projection
    return out


def random_updates(model, seed=1, amplitude=0.1, **kinds) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> path -> (A (r, in[, kh, kw]), B (out, r[, 1, 1])), random, each of std `amplitude`."""
    gen = torch.Generator().manual_seed(seed)
    return {component: {path: random_pair(layer, gen, amplitude) for path, layer in layers.items()}
            for component, layers in targets(model, **kinds).items()}


def random_pair(layer, gen, amplitude=0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PEFT's shapes for a Linear or Conv2d layer."""
    if isinstance(layer, torch.nn.Conv2d):
        a = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=gen)
        b = torch.randn(layer.out_channels, RANK, 1, 1, generator=gen)
    else:
        a, b = torch.randn(RANK, layer.in_features, generator=gen), torch.randn(layer.out_features, RANK, generator=gen)
    return amplitude * a, amplitude * b


def sgm_path(path: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet attention path -> Stability's original (sgm) name, as kohya's SDXL scripts write it:
    down_blocks.i.attentions.j = input_blocks.(1 + i (n + 1) + j).1, mid_block.attentions.0 = middle_block.1,
    up_blocks.i.attentions.j = output_blocks.(i (n + 2) + j).1 (n = layers per block)."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    i, j = int(parts[1]), int(parts[3])
    assert parts[2] == "attentions", path
    block = ("input_blocks", 1 + i * (layers_per_block + 1) + j) if parts[0] == "down_blocks" else (
        "output_blocks", i * (layers_per_block + 1) + j)
    return ".".join([block[0], str(block[1]), "1", *parts[4:]])


def save(tensors, folder, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHT_FILE),
              metadata={"format": "pt", **(metadata or {})})
    return folder / WEIGHT_FILE


def kohya_tensors(updates, alpha=None, unet_names="diffusers") -> dict[str, torch.Tensor]:
    """`lora_unet_..._to_q.lora_down.weight` / `.lora_up.weight` / `.alpha`, the text encoders as
    `lora_te1_text_model_encoder_...` and `lora_te2_...`; UNet modules by diffusers' or sgm's names."""
    out = {}
    for component, modules in updates.items():
        for path, (a, b) in modules.items():
            shown = sgm_path(path) if component == "unet" and unet_names == "sgm" else path
            name = KOHYA_PREFIXES[component] + shown.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_tensors(updates, style="peft") -> dict[str, torch.Tensor]:
    """diffusers' layouts: PEFT's `unet.<path>.lora_A.weight` / `.lora_B.weight`, text encoder paths without
    `text_model.` (as diffusers with transformers 5 writes them); "old": diffusers' LoRA layers before PEFT
    (`unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`)."""
    out = {}
    for component, modules in updates.items():
        for path, (a, b) in modules.items():
            if style == "peft":
                stem = f"{component}.{path.removeprefix('text_model.')}"
                out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a, b
            else:
                middle = "lora" if component == "unet" else "lora_linear_layer"
                out[f"{component}.{path}.{middle}.down.weight"], out[f"{component}.{path}.{middle}.up.weight"] = a, b
    return out


def lora_configs(updates, lora_alpha) -> dict[str, str]:
    """diffusers' `lora_adapter_metadata`: each component's LoraConfig as "<component>.<field>"."""
    fields = {}
    for component, modules in updates.items():
        # the adapted modules by their paths as the keys give them: PEFT matches a target as a dotted tail,
        # and diffusers adapts every module a target matches (a tail such as "resnets.0.conv1" would also
        # add adapters of uninitialised weights to modules the file has none for)
        names = sorted(p.removeprefix("text_model.") for p in modules)
        fields |= {f"{component}.r": RANK, f"{component}.lora_alpha": lora_alpha[component],
                   f"{component}.target_modules": names}
    return {METADATA_KEY: json.dumps(fields)}


def expected_weights(model, updates, scales, weight):
    """(component, path) -> W + weight * scale * B @ A."""
    out = {}
    for component, modules in updates.items():
        for path, (a, b) in modules.items():
            w = getattr(model, component).get_submodule(path).weight.detach()
            out[component, path] = w + weight * scales[component] * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    return out


def merged_weights(model, updates):
    return {(c, p): getattr(model, c).get_submodule(p).weight.detach().clone() for c, m in updates.items() for p in m}


# The cases: (how the file is written, the scale each component's modules get).
def case(model, name, tmp_path, amplitude=0.1):
    if name.startswith("kohya"):  # alpha 2 on every module: alpha / rank = 0.5
        updates = random_updates(model, seed=2, amplitude=amplitude)
        names = "sgm" if name == "kohya-sgm" else "diffusers"
        if names == "sgm":
            del updates["unet"][UNET_CONV]  # a resnet conv has other sgm names (in_layers.2); attention only
        return save(kohya_tensors(updates, alpha=2, unet_names=names), tmp_path / name), updates, \
            dict.fromkeys(updates, 2 / RANK)
    updates = random_updates(model, seed=3, amplitude=amplitude, projection=True)
    if name == "peft-old":  # diffusers' older names carry no LoraConfig: scale 1
        return save(peft_tensors(updates, "old"), tmp_path / name), updates, dict.fromkeys(updates, 1.0)
    alphas = {"unet": 2, "text_encoder": 8, "text_encoder_2": 4}  # lora_alpha / r: 0.5, 2, 1
    path = save(peft_tensors(updates), tmp_path / name, lora_configs(updates, alphas))
    return path, updates, {c: alphas[c] / RANK for c in updates}


CASES = ["kohya", "kohya-sgm", "peft", "peft-old"]
DIFFUSERS_CASES = ["kohya", "kohya-sgm", "peft"]  # diffusers reads the older names only for SD 1.x-style files


# --- the merged weights (no diffusers needed) -------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_each_layout_merges_into_all_three_networks(model, tmp_path, name):
    path, updates, scales = case(model, name, tmp_path)
    before = merged_weights(model, updates)
    weight = 0.7
    expected = expected_weights(model, updates, scales, weight)
    with apply_lora(model, path, weight) as handle:
        assert len(handle.applied) == sum(len(m) for m in updates.values()) and not handle.skipped
        for (component, module), want in expected.items():
            got = getattr(model, component).get_submodule(module).weight
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{name}: {component}.{module}")
    after = merged_weights(model, updates)
    assert all(torch.equal(after[k], before[k]) for k in before)  # unmerged exactly


def test_refiner_takes_kohya_and_peft_loras(tmp_path):
    """The refiner's networks: bigG (`lora_te2_`, `text_encoder_2.`) and its 4-level UNet."""
    torch.manual_seed(1)
    refiner = sdlab.Model.build(TINY_SDXL_REFINER)
    updates = random_updates(refiner, seed=4)
    assert set(updates) == {"unet", "text_encoder_2"}
    for name, tensors, scale in (("kohya", kohya_tensors(updates, alpha=1), 1 / RANK),
                                 ("peft", peft_tensors(updates), 1.0)):
        expected = expected_weights(refiner, updates, dict.fromkeys(updates, scale), 1.0)
        with apply_lora(refiner, save(tensors, tmp_path / name)) as handle:
            assert len(handle.applied) == len(expected) and not handle.skipped
            for (component, module), want in expected.items():
                torch.testing.assert_close(getattr(refiner, component).get_submodule(module).weight, want,
                                           rtol=0, atol=1e-6)


# --- against diffusers ------------------------------------------------------------------------------------


def _weight(network, path):
    """A module's weight, by its path with or without `text_model.` (transformers 5 names CLIPTextModel's
    modules without it; sdlab's and CLIPTextModelWithProjection's have it)."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        try:
            return network.get_submodule(candidate).weight
        except AttributeError:
            continue
    raise AttributeError(path)


def diffusers_fused(pipe, path, weight, modules):
    """(component, path) -> the weight after diffusers' load_lora_weights + fuse_lora(lora_scale=weight);
    the pipeline's networks are restored after."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    networks = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    originals = {c: {k: v.clone() for k, v in n.state_dict().items()} for c, n in networks.items()}
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="test")
        pipe.fuse_lora(lora_scale=weight, adapter_names=["test"])
        pipe.unload_lora_weights()  # the fused weights stay, the PEFT layers go
        return {(c, p): _weight(networks[c], p).detach().clone() for c, p in modules}
    finally:
        pipe.unload_lora_weights()
        for c, network in networks.items():
            network.load_state_dict(originals[c])


@pytest.mark.parametrize("name", DIFFUSERS_CASES)
def test_merged_weights_equal_diffusers_fuse_lora(model, pipe, tmp_path, name):
    path, updates, _ = case(model, name, tmp_path)
    weight = 0.6
    modules = [(c, p) for c, m in updates.items() for p in m]
    theirs = diffusers_fused(pipe, path, weight, modules)
    with apply_lora(model, path, weight):
        ours = merged_weights(model, updates)
    plain = merged_weights(model, updates)
    for key in modules:
        assert (ours[key] - plain[key]).abs().max() > 1e-3, key  # the LoRA acts on every module
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")


def test_a_file_peft_and_diffusers_write_is_read_as_diffusers_reads_it(model, pipe, folder, tmp_path):
    """LoRA layers made by PEFT itself (lora_alpha / r = 2 for the UNet, 1 and 0.5 for the encoders, bigG's
    text_projection adapted too) and written by diffusers' `save_lora_weights` with their LoraConfigs."""
    peft = pytest.importorskip("peft", reason="PEFT writes the adapters here")
    from peft.utils import get_peft_model_state_dict

    writer = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    text = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    configs = {"unet": peft.LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=[
                   "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]),
               "text_encoder": peft.LoraConfig(r=RANK, lora_alpha=4, init_lora_weights=False, target_modules=text),
               "text_encoder_2": peft.LoraConfig(r=RANK, lora_alpha=2, init_lora_weights=False,
                                                 target_modules=[*text, "text_projection"])}
    torch.manual_seed(5)
    layers = {}
    for component, config in configs.items():
        peft.inject_adapter_in_model(config, getattr(writer, component))
        layers[component] = get_peft_model_state_dict(getattr(writer, component))
    writer.save_lora_weights(
        tmp_path, **{f"{c}_lora_layers": sd for c, sd in layers.items()},
        **{f"{c}_lora_adapter_metadata": config.to_dict() for c, config in configs.items()})
    path = tmp_path / WEIGHT_FILE
    adapted = [(c, key.removesuffix(".lora_A.weight")) for c, sd in layers.items() for key in sd
               if key.endswith(".lora_A.weight")]
    with apply_lora(model, path) as handle:
        assert len(handle.applied) == len(adapted) == 229 and not handle.skipped
        assert "lora_te2_text_projection" in handle.applied
        ours = {(c, p): _weight(getattr(model, c), p).detach().clone() for c, p in adapted}
    plain = {(c, p): _weight(getattr(model, c), p) for c, p in adapted}
    theirs = diffusers_fused(pipe, path, 1.0, adapted)
    for key in adapted:
        assert (ours[key] - plain[key]).abs().max() > 1e-3, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=str(key))


def test_generated_image_matches_diffusers(model, pipe, tmp_path):
    """One image through sdlab's generation path (GenerationParams.loras, and a <lora:name:w> tag) against
    StableDiffusionXLPipeline with the same PEFT file loaded at the same weight (Euler, "leading" steps)."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    path, _, _ = case(model, "peft", tmp_path, amplitude=0.3)  # strong enough to change the picture
    weight = 0.7
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="test")
    try:
        pipe.set_adapters(["test"], adapter_weights=[weight])
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=3.0, height=64,
                        width=64, output_type="np", generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        pipe.unload_lora_weights()
    plain, by_param, by_tag = generated(model, path, weight)
    got, want = np.asarray(by_param, dtype=np.int16), (expected * 255).round().astype(np.int16)
    assert want.std() > 10, "the reference image is flat: the comparison would prove nothing"
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 20  # the LoRA changes the picture
    assert np.abs(got - want).max() <= 2
    assert np.abs(np.asarray(by_tag, dtype=np.int16) - got).max() <= 2


def test_a_kohya_lora_by_parameter_and_by_tag(model, tmp_path):
    """A kohya file through GenerationParams.loras and through a <lora:name:w> tag: the same image, not the
    plain one (its merged weights equal diffusers', above)."""
    path, _, _ = case(model, "kohya-sgm", tmp_path, amplitude=0.3)
    plain, by_param, by_tag = generated(model, path, 0.8)
    got = np.asarray(by_param, dtype=np.int16)
    assert np.abs(got - np.asarray(plain, dtype=np.int16)).max() > 20
    assert np.array_equal(np.asarray(by_tag, dtype=np.int16), got)


PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"


def generated(model, path, weight):
    """(plain image, with the LoRA by GenerationParams.loras, with it by a <lora:style:w> tag)."""
    params = sdlab.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=4,
                                    sampler="Euler", schedule="automatic", cfg_scale=3.0, seed=0)

    def run(p, **kw):
        return sdlab.generate(model, p, generator=torch.Generator().manual_seed(3), **kw).images[0]

    return (run(params), run(params.replace(loras=((str(path), weight),))),
            run(params.replace(prompt=f"{PROMPT} <lora:style:{weight}>"), named_loras={"style": path}))


# --- LoRAs for another architecture -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_model():
    torch.manual_seed(2)
    return sdlab.Model.build(TINY)


def sd1_updates(sd1_model):
    gen = torch.Generator().manual_seed(6)
    layers = {"unet": {p: m for p, m in sd1_model.unet.named_modules() if p.endswith(UNET_ENDINGS)},
              "text_encoder": {p: m for p, m in sd1_model.text_encoder.named_modules() if p.endswith(TEXT_ENDINGS)}}
    return {c: {p: random_pair(m, gen) for p, m in ls.items()} for c, ls in layers.items()}


def sd1_kohya(updates):
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    out = {}
    for component, modules in updates.items():
        for path, (a, b) in modules.items():
            name = prefixes[component] + path.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
    return out


def assert_refused(target, path, lora_family, match=None):
    meta = target.unet.conv_in.weight.is_meta
    before = {} if meta else {k: v.clone() for k, v in target.unet.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        apply_lora(target, path)
    message = str(info.value)
    assert message.count(str(path)) == 1, message  # the file, once
    assert f"is for {families.get_family(lora_family).label}" in message, message  # what the LoRA is for
    assert f"{target.config.name!r}, {families.family_of(target.config).label}" in message, message  # the model
    assert all(torch.equal(v, before[k]) for k, v in before.items())  # unchanged
    return message


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_sd1_lora_on_sdxl_is_refused_naming_both(model, sd1_model, tmp_path, layout):
    updates = sd1_updates(sd1_model)
    tensors = sd1_kohya(updates) if layout == "kohya" else peft_tensors(updates)
    message = assert_refused(model, save(tensors, tmp_path / layout), "sd1")
    assert "32-wide text context" in message and "64" in message


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_sdxl_lora_on_sd1_is_refused_naming_both(model, sd1_model, tmp_path, layout):
    updates = random_updates(model, seed=7)
    tensors = kohya_tensors(updates) if layout == "kohya" else peft_tensors(updates)
    message = assert_refused(sd1_model, save(tensors, tmp_path / layout), "sdxl")
    assert "64-wide text context" in message and "32" in message


def test_an_sdxl_lora_with_only_second_encoder_keys_on_sd1_is_refused(model, sd1_model, tmp_path):
    """Nothing of it matches an SD 1.x model: refused, saying what it is for (by its keys)."""
    updates = {"text_encoder_2": random_updates(model, seed=8)["text_encoder_2"]}
    for layout, tensors in (("kohya", kohya_tensors(updates)), ("peft", peft_tensors(updates))):
        message = assert_refused(sd1_model, save(tensors, tmp_path / layout), "sdxl")
        assert "none of its" in message


def test_base_and_refiner_loras_are_not_swapped(model, tmp_path):
    torch.manual_seed(3)
    refiner = sdlab.Model.build(TINY_SDXL_REFINER)
    base_lora = save(kohya_tensors(random_updates(model, seed=9, conv=False)), tmp_path / "base")
    refiner_lora = save(kohya_tensors(random_updates(refiner, seed=9, conv=False)), tmp_path / "refiner")
    assert_refused(refiner, base_lora, "sdxl")
    assert_refused(model, refiner_lora, "sdxl-refiner")


def test_real_sizes_name_the_families(tmp_path):
    """SD 1.5 and SDXL base at their real sizes (built on the meta device: only shapes are looked at before
    a misfit is refused): the message says which each LoRA is for, by its keys and its context width."""
    sd15, xl = (sdlab.Model.build(families.get_family(f).presets[0], device="meta") for f in ("sd1", "sdxl"))

    def lora(modules):
        return {f"{name}.{part}": torch.zeros(shape) for name, (o, i) in modules.items()
                for part, shape in (("lora_down.weight", (RANK, i)), ("lora_up.weight", (o, RANK)))}

    attn = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn"
    for_sd15 = lora({f"{attn}2_to_k": (640, 768), f"{attn}1_to_q": (640, 640),
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)})
    for_xl = lora({f"{attn}2_to_k": (640, 2048), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                   "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)})
    message = assert_refused(xl, save(for_sd15, tmp_path / "sd15"), "sd1")
    assert "768-wide text context; this model's, 2048" in message and "'sdxl-base'" in message
    message = assert_refused(sd15, save(for_xl, tmp_path / "xl"), "sdxl")
    assert "2048-wide text context; this model's, 768" in message
