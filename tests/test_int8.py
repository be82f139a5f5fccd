"""int8 inference (`sdlab.load(path, quantize="int8")`, `sdlab.perf.quantize_int8`): each int8 layer computes
exactly what its quantized weight and activation codes say, stays within int8's error of the float layer, and
saves its dequantized weight; a quantized model's images stay close to bf16's, LoRAs merge into it and come out
again bit for bit, low-memory mode gives the same images, and the CLI and the server take the option."""

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdlab
from sdlab import GenerationParams, perf
from sdlab.errors import ParameterError

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")

PARAMS = GenerationParams(prompt="a red circle above a blue square", negative_prompt="blurry", width=64, height=64,
                          steps=8, seed=3)


def _fake_quantized(x: torch.Tensor) -> torch.Tensor:
    """What an int8 layer's activation codes stand for: x rounded to the per-tensor grid around ZERO_POINT."""
    z = perf.ZERO_POINT
    scale = max(-float(x.min()) / z, float(x.max()) / (255 - z), 1e-12)
    return (torch.round(x / scale).clamp(-z, 255 - z)) * scale


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_linear_computes_its_quantized_product(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(96, 48).to(dtype)
    original = layer.weight.detach().clone()
    x = torch.randn(2, 30, 96, dtype=dtype)
    expected_float = layer(x)
    layer.__class__ = perf.Int8Linear
    y = layer(x)
    assert y.dtype == dtype and layer.packed is not None and layer.packed.dtype == torch.int8
    weight = layer.weight  # dequantized: within half a quantization step of the original (and dtype's rounding)
    assert weight.dtype == dtype
    rounding = original.float().abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert ((weight.float() - original.float()).abs() <= layer.weight_scale[:, None] * 0.501 + rounding).all()
    exact = F.linear(_fake_quantized(x.float()), weight.float(), layer.bias.float())
    assert _relative_error(y, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert _relative_error(y, expected_float) < 0.02


@torch.inference_mode()
def test_an_int8_conv_computes_its_quantized_product_at_any_size():
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 16, 3, padding=1)
    reference = nn.Conv2d(32, 16, 3, padding=1)
    reference.load_state_dict(layer.state_dict())
    layer.__class__ = perf.Int8Conv2d
    for side in (8, 12, 8):  # packed at the first size, reused at the others
        x = torch.randn(2, 32, side, side) + 0.3
        y = layer(x)
        exact = F.conv2d(_fake_quantized(x), layer.weight, layer.bias, padding=1)
        assert _relative_error(y, exact) < 1e-5
        assert _relative_error(y, reference(x)) < 0.02
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def builtin_file(tmp_path_factory):
    """The built-in model as one memory-mapped .safetensors file (low-memory mode needs a file)."""
    return sdlab.Model.from_name("builtin").save(tmp_path_factory.mktemp("builtin") / "model.safetensors",
                                                 layout="single-file")


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


@torch.inference_mode()
def test_a_quantized_model_stays_close_to_bf16_and_saves_dequantized_weights(builtin_file, tmp_path):
    bf16 = sdlab.load(builtin_file, dtype=torch.bfloat16)
    int8 = sdlab.load(builtin_file, dtype=torch.bfloat16, quantize="int8")
    unet = int8.unet
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, perf.Int8Conv2d)
    assert isinstance(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, perf.Int8Linear)
    for kept in (unet.conv_in, unet.conv_out, unet.time_embedding.linear_1,
                 unet.down_blocks[0].resnets[0].time_emb_proj):  # see perf._KEPT_IN_FLOAT
        assert not isinstance(kept, perf._Int8Weight)
    assert not any(isinstance(m, perf._Int8Weight) for m in int8.vae.modules())
    expected, got = _pixels(sdlab.generate(bf16, PARAMS)), _pixels(sdlab.generate(int8, PARAMS))
    difference = np.abs(got - expected)
    assert difference.mean() < 1.5 and difference.max() < 48, (difference.mean(), difference.max())
    assert np.array_equal(_pixels(sdlab.generate(int8, PARAMS)), got)  # deterministic: no state from earlier calls

    plain_keys = list(bf16.unet.state_dict())
    saved = unet.state_dict()
    assert list(saved) == plain_keys
    assert saved["down_blocks.0.resnets.0.conv1.weight"].dtype == torch.bfloat16
    reloaded = sdlab.load(int8.save(tmp_path / "int8"), dtype=torch.bfloat16, quantize="int8")
    assert np.array_equal(_pixels(sdlab.generate(reloaded, PARAMS)), got)  # requantizing dequantized weights


def test_loras_merge_into_int8_layers_and_come_out_exactly(builtin_file, tmp_path):
    from sdlab.lora import inject_lora

    model = sdlab.load(builtin_file, dtype=torch.bfloat16, quantize="int8")
    before = _pixels(sdlab.generate(model, PARAMS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        network = inject_lora(sdlab.Model.from_name("builtin", plain=True), rank=4)
        network.detach()
        with torch.no_grad():
            for adapter in network.adapters.values():
                adapter.lora_up.weight.normal_(0, 0.5)
        lora = network.save(tmp_path / "random.safetensors")
    with_lora = _pixels(sdlab.generate(model, PARAMS.replace(loras=[(lora, 1.0)])))
    assert np.abs(with_lora - before).mean() > 1  # the LoRA changed the int8 model's image
    bf16_with_lora = _pixels(sdlab.generate(sdlab.load(builtin_file, dtype=torch.bfloat16),
                                            PARAMS.replace(loras=[(lora, 1.0)])))
    assert np.abs(with_lora - bf16_with_lora).mean() < 1.5  # ... as it changes bf16's
    assert np.array_equal(_pixels(sdlab.generate(model, PARAMS)), before)  # and it came out again


@torch.inference_mode()
def test_low_memory_mode_gives_the_same_images(builtin_file):
    ordinary = sdlab.load(builtin_file, dtype=torch.bfloat16, quantize="int8")
    low = sdlab.load(builtin_file, dtype=torch.bfloat16, quantize="int8", low_memory=True)
    expected = _pixels(sdlab.generate(ordinary, PARAMS))
    assert np.array_equal(_pixels(sdlab.generate(low, PARAMS)), expected)
    assert np.array_equal(_pixels(sdlab.generate(low, PARAMS)), expected)  # the UNet brought in a second time
    assert isinstance(low.unet.down_blocks[0].resnets[0].conv1, perf.Int8Conv2d)
    assert low.residency.resident == {"vae"}  # the int8 UNet went home after its stage, as a float one does


def test_bad_options_are_refused_clearly(builtin_file):
    with pytest.raises(ParameterError, match="quantize must be one of int8"):
        sdlab.load(builtin_file, quantize="int4")
    with pytest.raises(ParameterError, match="plain=True"):
        sdlab.load(builtin_file, quantize="int8", plain=True)
    with pytest.raises(ParameterError, match="fp32 or bf16"):
        sdlab.load(builtin_file, quantize="int8", dtype=torch.float16)


def test_cli_and_server(builtin_file, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from sdlab.cli import main
    from sdlab.server import ServerSettings, create_app

    expected = _pixels(sdlab.generate(sdlab.load(builtin_file, dtype=torch.bfloat16, quantize="int8"), PARAMS))[0]
    flags = ["generate", PARAMS.prompt, "--negative-prompt", PARAMS.negative_prompt, "--model", str(builtin_file),
             "--steps", "8", "--seed", "3", "--size", "64x64", "--dtype", "bf16", "--quantize", "int8", "-q"]
    assert main([*flags, "--out", str(tmp_path / "cli")]) == 0
    made = np.asarray(Image.open(next((tmp_path / "cli").glob("*.png"))).convert("RGB"), dtype=np.int16)
    assert np.array_equal(made, expected)

    settings = ServerSettings(model=str(builtin_file), dtype="bf16", quantize="int8")
    body = {"prompt": PARAMS.prompt, "negative_prompt": PARAMS.negative_prompt, "seed": 3, "steps": 8, "width": 64,
            "height": 64, "sampler_name": PARAMS.sampler}
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert np.array_equal(np.asarray(served, dtype=np.int16), expected)
