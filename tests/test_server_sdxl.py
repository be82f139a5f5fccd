"""The server with SDXL models: listed by /sdapi/v1/sd-models, generating, and A1111's refiner_checkpoint /
refiner_switch_at (the refiner chosen by name from the configured models; bad choices are 422s before any
model work)."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdlab import GenerationParams, Model, generate
from sdlab.config import TINY
from sdlab.families.sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdlab.pngmeta import parse_infotext, read_infotext
from sdlab.server import ServerSettings, create_app

LOCAL = "http://localhost"
BODY = {"prompt": "a red circle", "seed": 5, "steps": 4, "width": 64, "height": 64, "cfg_scale": 3,
        "sampler_name": "Euler", "scheduler": "Automatic"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for config, name in ((TINY_SDXL, "xl-base"), (TINY_SDXL_REFINER, "xl-refiner"), (TINY, "sd-tiny")):
        torch.manual_seed(0)
        Model.build(config).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    settings = ServerSettings(model=str(models_dir / "xl-base"), models_dir=models_dir)
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        yield c


def _image(data: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data["images"][0])))


def test_sd_models_lists_sdxl_models(client):
    names = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"xl-base", "xl-refiner", "sd-tiny"} <= names


def test_refiner_checkpoint_matches_the_python_api(client, models_dir):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.6})
    assert r.status_code == 200, r.text
    served = _image(r.json())
    fields = parse_infotext(read_infotext(served)).fields
    assert fields["Refiner"].startswith("xl-refiner [") and fields["Refiner switch at"] == "0.6"

    base, refiner = Model.load(models_dir / "xl-base"), Model.load(models_dir / "xl-refiner")
    params = GenerationParams(prompt="a red circle", seed=5, steps=4, width=64, height=64, cfg_scale=3,
                              sampler="Euler", schedule="automatic", refiner_switch_at=0.6)
    expected = generate(base, params, refiner=refiner).images[0]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected))
    plain = client.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "None"})
    assert plain.status_code == 200 and "Refiner" not in json.loads(plain.json()["info"])["infotexts"][0]
    assert not np.array_equal(np.asarray(_image(plain.json()).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("change, status, words", [
    ({"refiner_checkpoint": "no-such-model"}, 422, "unknown model"),
    ({"refiner_checkpoint": "sd-tiny"}, 422, "other latents"),
    ({"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 2}, 422, "refiner_switch_at"),
    ({"refiner_checkpoint": "../xl-refiner"}, 422, "unknown model"),
])  # fmt: skip
def test_bad_refiner_choices_are_refused_before_any_work(client, change, status, words):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, **change})
    assert r.status_code == status and words in r.text, r.text


def test_a_costlier_refiner_prices_the_request(models_dir):
    """Any share of the steps may run on the refiner, so a request is bounded as if all ran on the costlier
    model: with the tiny refiner as the main model and the (costlier) tiny base as its "refiner", a budget
    between the two prices admits the plain request and refuses the refined one."""
    from sdlab.server.limits import JobLimits

    rate = 1e9  # FLOP/s fixed by the settings: no calibration
    pricing = JobLimits(ServerSettings(flops_per_second=rate))
    params = GenerationParams(prompt="a red circle", seed=5, steps=4, width=64, height=64, cfg_scale=3)
    cheap, costly = (pricing.estimate(c, params.resolved(c)) / rate for c in (TINY_SDXL_REFINER, TINY_SDXL))
    assert cheap < costly
    settings = ServerSettings(model=str(models_dir / "xl-refiner"), models_dir=models_dir, flops_per_second=rate,
                              max_job_seconds=(cheap + costly) / 2)
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        assert c.post("/sdapi/v1/txt2img", json=BODY).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "xl-base"})
        assert r.status_code == 422 and "max_job_seconds" in r.text, r.text
