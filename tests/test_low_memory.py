"""Low-memory mode (`sdlab.load(path, low_memory=True)`, `sdlab.residency`): only the running stage's networks
are in memory, the others point at the memory-mapped file with their pages dropped from the process, and the
images are exactly those of an ordinarily loaded model (fp32, and bf16 with packed weights), base + refiner
included."""

import logging
import os

import numpy as np
import pytest
import torch

import sdlab
from sdlab import GenerationParams, perf
from sdlab.errors import ParameterError
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.generation import decode_latents
from sdlab.residency import Residency

PARAMS = GenerationParams(prompt="a red circle above a blue square", negative_prompt="blurry", steps=4, seed=2,
                          width=64, height=64, cfg_scale=4.0, sampler="DPM++ 2M")


def _save(tmp_path_factory, config, name, layout="diffusers"):
    torch.manual_seed(0)
    model = sdlab.Model.build(config)
    target = tmp_path_factory.mktemp(name) / ("model.safetensors" if layout == "single-file" else "model")
    return model.save(target, layout=layout)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    return _save(tmp_path_factory, sdlab.PRESETS["tiny"], "sd", layout="single-file")


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    return _save(tmp_path_factory, TINY_SDXL, "base"), _save(tmp_path_factory, TINY_SDXL_REFINER, "refiner")


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def _resident_pages(tensor: torch.Tensor) -> int:
    """How many of the tensor's whole pages this process has in memory (from /proc/self/pagemap)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first // page * 8)
        entries = np.frombuffer(pagemap.read((last - first) // page * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_images_as_an_ordinary_load(sd_file, dtype):
    ordinary = perf.optimize(sdlab.load(sd_file, dtype=dtype))
    low = perf.optimize(sdlab.load(sd_file, dtype=dtype, low_memory=True))
    assert low.dtype == dtype and low.residency.resident == set()
    for params in (PARAMS, PARAMS.replace(seed=5)):  # twice: the second run brings every network in again
        assert np.array_equal(_pixels(sdlab.generate(low, params)), _pixels(sdlab.generate(ordinary, params)))


def test_one_stage_at_a_time(sd_file):
    """Each network runs with only its own stage in memory; the others point at the file, pages dropped."""
    model = sdlab.load(sd_file, dtype=torch.bfloat16, low_memory=True)  # the file is fp32: stages convert
    seen = {}

    def note_resident(name):
        return lambda *_: seen.setdefault(name, set(model.residency.resident)) and None

    for name, net in model.components.items():
        getattr(net, "decoder", net).register_forward_pre_hook(note_resident(name))  # the VAE runs .decode()
    sdlab.generate(model, PARAMS)
    assert seen == {"text_encoder": {"text_encoder"}, "unet": {"unet"}, "vae": {"vae"}}
    for name in ("text_encoder", "unet"):  # sent home: the file's fp32 tensors, not in this process's memory
        homes = model.residency.homes[name]
        for key, tensor in getattr(model, name).state_dict().items():
            assert tensor.data_ptr() == homes[key].data_ptr() and tensor.dtype == torch.float32
        big = max(homes.values(), key=torch.Tensor.numel)
        assert perf.in_file_mapping(big.data_ptr()) and _resident_pages(big) == 0
    assert model.residency.resident == {"vae"}  # the last stage stays until another needs room
    # Packed layers (sdlab.load packs by default) convert as they pack, at their first call: the decoder's
    # did; the encoder's, unused in txt2img, still point at the file.
    assert model.vae.decoder.conv_in.packed.dtype == torch.bfloat16
    assert model.vae.encoder.conv_in.weight.dtype == torch.bfloat16  # (read as converted)
    assert model.vae.encoder.conv_in.state_dict()["weight"].dtype == torch.bfloat16


def test_a_preview_decode_keeps_the_unet(sd_file, monkeypatch):
    """A step callback that decodes previews (as the server's progress does) uses the VAE inside the UNet's
    stage: the UNet stays, and is brought in once per generation, not once per step."""
    model = perf.optimize(sdlab.load(sd_file, dtype=torch.bfloat16, low_memory=True))
    brought_in = []
    original = Residency._bring_in
    monkeypatch.setattr(Residency, "_bring_in", lambda self, name, net: (brought_in.append(name),
                                                                         original(self, name, net)))
    previews = []
    result = sdlab.generate(model, PARAMS, callback=lambda info: previews.append(decode_latents(model, info.denoised)))
    assert len(previews) == PARAMS.steps and result.images
    assert brought_in == ["text_encoder", "unet", "vae"]


def test_base_and_refiner(sdxl_folders):
    base_folder, refiner_folder = sdxl_folders
    params = PARAMS.replace(steps=6, refiner_switch_at=0.5)
    expected = sdlab.generate(sdlab.load(base_folder), params, refiner=sdlab.load(refiner_folder))
    base, refiner = sdlab.load(base_folder, low_memory=True), sdlab.load(refiner_folder, low_memory=True)
    got = sdlab.generate(base, params, refiner=refiner)
    assert np.array_equal(_pixels(got), _pixels(expected))
    assert base.residency.resident == {"unet"}  # the refiner decoded the switched run
    assert refiner.residency.resident == {"vae"}


def test_dtype_changes_and_loras(sd_file, tmp_path):
    model = sdlab.load(sd_file, low_memory=True)
    sdlab.generate(model, PARAMS)
    model.to(dtype=torch.bfloat16)  # everything goes home; later stages convert to bf16
    assert model.residency.resident == set() and model.dtype == torch.bfloat16
    assert next(model.unet.parameters()).dtype == torch.float32
    sdlab.generate(model, PARAMS)
    assert model.vae.decoder.conv_in.packed.dtype == torch.bfloat16
    with pytest.raises(ParameterError, match="low-memory model"):
        sdlab.generate(model, PARAMS.replace(loras=[(tmp_path / "any.safetensors", 1.0)]))


def test_an_unmapped_checkpoint_is_warned_about(sd_file, tmp_path, caplog):
    from safetensors.torch import load_file

    pickled = tmp_path / "model.ckpt"
    # A legacy (non-zip) torch pickle: read into memory (a zip .ckpt whose members are stored is mapped).
    torch.save({"state_dict": load_file(sd_file)}, pickled, _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING, logger="sdlab.residency"):
        model = sdlab.load(pickled, family="tiny", low_memory=True)  # (a pickle has no metadata naming it)
    assert "not memory-mapped" in caplog.text
    assert _pixels(sdlab.generate(model, PARAMS)).shape == (1, 64, 64, 3)


def test_cli_and_server(sd_file, tmp_path):
    """`sdlab generate --low-memory` gives the ordinary image; a `--low-memory` server generates the same and
    refuses LoRA tags before any work (422)."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdlab.cli import main
    from sdlab.server import ServerSettings, create_app

    flags = ["generate", PARAMS.prompt, "--model", str(sd_file), "--steps", "4", "--seed", "2", "--size", "64x64",
             "--sampler", "DPM++ 2M", "-q"]
    assert main([*flags, "--out", str(tmp_path / "plain")]) == 0
    assert main([*flags, "--low-memory", "--out", str(tmp_path / "low")]) == 0
    plain, low = (np.asarray(Image.open(next((tmp_path / d).glob("*.png"))).convert("RGB")) for d in ("plain", "low"))
    assert np.array_equal(plain, low)

    settings = ServerSettings(model=str(sd_file), low_memory=True)
    body = {"prompt": PARAMS.prompt, "seed": 2, "steps": 4, "width": 64, "height": 64, "sampler_name": "DPM++ 2M"}
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert np.array_equal(np.asarray(served), plain)
        r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:style:1>"})
        assert r.status_code == 422 and "low-memory" in r.text


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting(sd_file, mode):
    """The VAE's encoder runs before the UNet's stage and its decoder after: the same images as ever."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    params = PARAMS.replace(init_image=Image.fromarray(pixels), strength=0.6,
                            mask=Image.fromarray(mask) if mode == "inpaint" else None)
    ordinary = sdlab.generate(sdlab.load(sd_file), params)
    low = sdlab.load(sd_file, low_memory=True)
    assert np.array_equal(_pixels(sdlab.generate(low, params)), _pixels(ordinary))
    assert low.residency.resident == {"vae"}
