"""The HTTP server in-process (FastAPI TestClient) on the tiny random model, 32x32 images, few steps."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdlab import GenerationParams, Model, generate
from sdlab.pngmeta import parse_infotext, read_infotext
from sdlab.server import ServerSettings, create_app
from sdlab.server.jobs import Job, JobQueue, QueueFullError

SMALL = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def reference_model():
    return Model.from_name("random:tiny")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerSettings(model="random:tiny"))) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- A1111 generation ----


def test_txt2img_matches_the_python_api(client, reference_model):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 21, "batch_size": 2, "cfg_scale": 5,
            "sampler_name": "Euler a", "scheduler": "Exponential", **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"images", "parameters", "info"} and data["parameters"]["prompt"] == "a red circle"
    info = json.loads(data["info"])
    assert info["all_seeds"] == [21, 22] and info["sampler_name"] == "Euler a" and info["width"] == 32
    expected = generate(reference_model, GenerationParams(prompt="a red circle", negative_prompt="blue", seed=21,
                                                          batch_size=2, cfg_scale=5, sampler="Euler a",
                                                          schedule="exponential", **SMALL))
    for b64, image, text in zip(data["images"], expected.images, info["infotexts"]):
        png = decode(b64)
        assert np.array_equal(pixels(png), pixels(image))
        assert read_infotext(png) == text
    fields = parse_infotext(info["infotexts"][1]).fields
    assert fields["Seed"] == "22" and fields["Schedule type"] == "Exponential"


def test_n_iter_runs_batches_with_following_seeds(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 5, "batch_size": 2, "n_iter": 2, **SMALL})
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 4 and info["all_seeds"] == [5, 6, 7, 8]


def test_old_style_sampler_name_with_schedule(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, "sampler_name": "DPM++ 2M Karras", **SMALL})
    assert r.status_code == 200
    fields = parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).fields
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_speedups_through_override_settings(client, reference_model):
    """A1111's token_merging_ratio setting, and sdlab's deepcache, reach the generation and its infotext."""
    settings = {"token_merging_ratio": 0.5, "deepcache": 2}
    body = {"prompt": "a red circle", "seed": 3, "override_settings": settings, "width": 64, "height": 64,
            "steps": 4}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    expected = generate(reference_model, GenerationParams(prompt="a red circle", seed=3, width=64, height=64,
                                                          steps=4, token_merging=0.5, deepcache=2))
    assert np.array_equal(pixels(decode(r.json()["images"][0])), pixels(expected.images[0]))
    fields = parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).fields
    assert (fields["Token merging ratio"], fields["DeepCache"]) == ("0.5", "2")


def test_img2img_and_inpaint(client, reference_model):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    body = {"prompt": "x", "seed": 3, "init_images": [b64_png(init)], "denoising_strength": 0.5, **SMALL}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    expected = generate(reference_model, GenerationParams(prompt="x", seed=3, init_image=init, strength=0.5,
                                                          **SMALL))
    assert np.array_equal(pixels(decode(r.json()["images"][0])), pixels(expected.images[0]))
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": "data:image/png;base64," + b64_png(mask)})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "width": 33}, "width=33 is not a multiple of 8"),
    ({"prompt": "x", "steps": 0}, "steps must be an integer from 1"),
    ({"prompt": "x", "batch_size": 100}, "batch_size"),
    ({"prompt": "x", "batch_size": 8, "n_iter": 4}, "at most 16 per request"),
    ({"prompt": "x" * 2001}, "prompt is 2001 characters"),
    ({"prompt": "x", "sampler_name": "Bogus"}, "unknown sampler 'Bogus'"),
    ({"prompt": "x", "scheduler": "weird"}, "unknown schedule 'weird'"),
    ({"prompt": "x", "cfg_scale": -1}, "cfg_scale"),
    ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "unknown model"),
    ({"prompt": "x", "force_task_id": "../x"}, "force_task_id"),
])
def test_invalid_requests_are_422_before_any_model_work(client, monkeypatch, body, message):
    from sdlab.server import engine

    ran = []
    monkeypatch.setattr(engine, "generate", lambda *a, **k: ran.append(1))
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert ran == []


def test_bad_images_and_types_are_422(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["not base64!"]})
    assert r.status_code == 422 and "init_images[0]: not valid base64" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [base64.b64encode(b"junk").decode()]})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]


# ---- progress, interrupt, trajectories ----


def test_progress_preview_and_interrupt(client):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, "width": 32, "height": 32, "steps": 200,
                                   "force_task_id": "long-one"})))
    thread.start()
    preview = None
    for _ in range(600):
        p = client.get("/sdapi/v1/progress").json()
        if p["current_image"]:
            preview = p
            break
        time.sleep(0.05)
    assert preview is not None, "no preview while the job ran"
    assert preview["state"]["job"] == "long-one" and preview["state"]["sampling_steps"] == 200
    assert 0 < preview["progress"] < 1 and decode(preview["current_image"]).size == (32, 32)
    job = client.get("/sdlab/v1/jobs/long-one").json()
    assert job["status"] == "running" and job["total"] == 200
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    r = result["r"]
    assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is True
    assert len(r.json()["images"]) == 1
    assert client.get("/sdlab/v1/jobs/long-one").json()["step"] < 200
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job"] == ""


def test_save_steps_gives_the_trajectory(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 2, "width": 32, "height": 32, "steps": 3,
                                               "batch_size": 2, "save_steps": True, "force_task_id": "traj"})
    assert r.status_code == 200
    steps = client.get("/sdlab/v1/jobs/traj/steps").json()
    assert steps["steps"] == [1, 2, 3] and len(steps["frames"]) == 3
    assert decode(steps["frames"][0]).size == (64, 32)  # the batch side by side
    final = pixels(decode(steps["frames"][-1]))[:, :32]
    assert np.array_equal(final, pixels(decode(r.json()["images"][0])))  # last x0 = the image
    gif = client.get("/sdlab/v1/jobs/traj/steps?format=gif")
    assert gif.headers["content-type"] == "image/gif" and Image.open(io.BytesIO(gif.content)).n_frames == 3
    assert client.get("/sdlab/v1/jobs/nope").status_code == 404
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "force_task_id": "traj", **SMALL})
    assert r.status_code == 409


# ---- the queue ----


def test_queue_is_bounded_and_answers_429():
    queue = JobQueue(maxsize=1)
    gate = threading.Event()
    first = queue.submit(Job(work=lambda job: gate.wait(10)))
    while first.status != "running":
        time.sleep(0.01)
    queue.submit(Job(work=lambda job: "second"))
    with pytest.raises(QueueFullError) as full:
        queue.submit(Job(work=lambda job: "third"))
    assert full.value.retry_after >= 1
    gate.set()
    queue.close(grace=1)


def test_full_queue_over_http_is_429_with_retry_after():
    app = create_app(ServerSettings(model="random:tiny", queue_size=1))
    with TestClient(app) as c:
        gate = threading.Event()
        state = app.state.sdlab
        blocker = state.queue.submit(Job(work=lambda job: gate.wait(20)))  # occupies the worker
        while blocker.status != "running":
            time.sleep(0.01)
        state.queue.submit(Job(work=lambda job: None))  # fills the queue
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
        if r.status_code != 429:
            gate.set()
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "32x32"})
        gate.set()
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_concurrent_requests_each_get_their_own_image(client, reference_model):
    seeds = [31, 32, 33, 34, 35, 36]
    responses = {}

    def ask(seed):
        responses[seed] = client.post("/sdapi/v1/txt2img", json={"prompt": f"shape {seed}", "seed": seed, **SMALL})

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for seed in seeds:
        r = responses[seed]
        assert r.status_code == 200
        expected = generate(reference_model, GenerationParams(prompt=f"shape {seed}", seed=seed, **SMALL))
        assert np.array_equal(pixels(decode(r.json()["images"][0])), pixels(expected.images[0]))


# ---- lists, options, png-info ----


def test_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_ancestral", "euler_a"]}.items() <= samplers[1].items()
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"name": "karras", "label": "Karras"}.items() <= schedulers[2].items()
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert set(models) == {"builtin", "random:tiny"}  # the shipped model is always offered by name
    assert len(models["random:tiny"]["hash"]) == 10
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models["random:tiny"]["title"] and options["sdlab_native_size"] == 64
    assert options["sdlab_default_schedule"] == "karras"  # the web UI preselects the model's own defaults
    assert options["sdlab_default_cfg"] == 7.0


def test_options_give_the_builtin_models_own_defaults():
    with TestClient(create_app(ServerSettings(model="builtin"))) as c:
        options = c.get("/sdapi/v1/options").json()
    assert options["sdlab_default_schedule"] == "automatic"  # zero-terminal SNR: its trailing timesteps
    assert options["sdlab_default_cfg"] == 2.0  # carried in its model_index.json


def test_options_accept_only_the_model_and_only_by_name(tmp_path):
    other = Model.from_name("random:tiny")
    with torch.no_grad():
        for weight in other.unet.parameters():
            weight.mul_(1.5)  # different weights from the startup model's
    other.save(tmp_path / "other.safetensors", layout="single-file")
    app = create_app(ServerSettings(model="random:tiny", models_dir=tmp_path))
    with TestClient(app) as c:
        names = [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
        assert names == ["builtin", "random:tiny", "other"]
        assert all(m["filename"] in ("builtin", "random:tiny", "other.safetensors")
                   for m in c.get("/sdapi/v1/sd-models").json())
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(tmp_path / "other.safetensors")})
        assert r.status_code == 422 and "unknown model" in r.json()["detail"]
        r = c.post("/sdapi/v1/options", json={"outdir_samples": "/tmp"})
        assert r.status_code == 422 and "cannot be set" in r.json()["detail"]
        body = {"prompt": "x", "seed": 4, **SMALL}
        before = c.post("/sdapi/v1/txt2img", json=body).json()
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("other.safetensors [")
        after = c.post("/sdapi/v1/txt2img", json=body).json()
        assert json.loads(after["info"])["sd_model_name"] == "other"
        assert not np.array_equal(pixels(decode(before["images"][0])), pixels(decode(after["images"][0])))


def test_png_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a, b", "negative_prompt": "c", "seed": 9, **SMALL})
    info = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert info["info"].startswith("a, b\nNegative prompt: c\nSteps: 2")
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Prompt"] == "a, b"
    plain = client.post("/sdapi/v1/png-info", json={"image": b64_png(Image.new("RGB", (4, 4)))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


# ---- OpenAI ----


def test_openai_generations(client, reference_model):
    r = client.post("/v1/images/generations", json={"prompt": "a star", "n": 2, "size": "32x32", "steps": 2,
                                                    "seed": 8})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and data[0]["revised_prompt"] == "a star"
    expected = generate(reference_model, GenerationParams(prompt="a star", seed=9, **SMALL))
    assert np.array_equal(pixels(decode(data[1]["b64_json"])), pixels(expected.images[0]))


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "size": "big"}, None),
    ({"prompt": "x", "size": "30x30"}, None),
    ({"n": 1}, "prompt"),
])
def test_openai_errors_are_400_in_openai_shape(client, body, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


# ---- security ----


def test_api_key_guards_every_route():
    with TestClient(create_app(ServerSettings(model="random:tiny", api_key="s3cret"))) as c:
        for path in ("/", "/sdapi/v1/samplers", "/static/app.js", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"], path
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "s3cret")).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "nope")).status_code == 401


def test_basic_auth():
    with TestClient(create_app(ServerSettings(model="random:tiny", basic_auth="ann:pw"))) as c:
        assert c.get("/").status_code == 401
        assert c.get("/", auth=("ann", "pw")).status_code == 200
        assert c.get("/", auth=("bob", "pw")).status_code == 401


def test_no_cors_unless_configured(client):
    headers = {"Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in client.get("/sdapi/v1/samplers", headers=headers).headers
    settings = ServerSettings(model="random:tiny", cors_origins=("http://ok.example",))
    with TestClient(create_app(settings)) as c:
        r = c.get("/sdapi/v1/samplers", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = c.get("/sdapi/v1/samplers", headers=headers)
        assert "access-control-allow-origin" not in r.headers


def test_defaults_are_safe():
    settings = ServerSettings()
    assert settings.host == "127.0.0.1" and settings.is_loopback and not settings.cors_origins


def test_web_ui_is_served_and_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    script = client.get("/static/app.js").text
    for text in (page.text, script, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
