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
LOCAL = "http://localhost"  # a loopback server answers only loopback Host names (TestClient's own is testserver)


@pytest.fixture(scope="module")
def reference_model():
    return Model.from_name("random:tiny")


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerSettings(model="random:tiny")), base_url=LOCAL) as c:
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
    with TestClient(app, base_url=LOCAL) as c:
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
    with TestClient(create_app(ServerSettings(model="builtin")), base_url=LOCAL) as c:
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
    with TestClient(app, base_url=LOCAL) as c:
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
    with TestClient(create_app(ServerSettings(model="random:tiny", api_key="s3cret")), base_url=LOCAL) as c:
        for path in ("/", "/sdapi/v1/samplers", "/static/app.js", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"], path
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "s3cret")).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("anyone", "nope")).status_code == 401


def test_basic_auth():
    with TestClient(create_app(ServerSettings(model="random:tiny", basic_auth="ann:pw")), base_url=LOCAL) as c:
        assert c.get("/").status_code == 401
        assert c.get("/", auth=("ann", "pw")).status_code == 200
        assert c.get("/", auth=("bob", "pw")).status_code == 401


def test_no_cors_unless_configured(client):
    headers = {"Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in client.get("/sdapi/v1/samplers", headers=headers).headers
    settings = ServerSettings(model="random:tiny", cors_origins=("http://ok.example",))
    with TestClient(create_app(settings), base_url=LOCAL) as c:
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


# ---- web-facing hardening ----


def png_with_chunks(width: int, height: int, before_idat=(), after_idat=(), idat: bytes | None = None) -> bytes:
    """A hand-made RGB PNG: its header declares width x height, with extra (type, data) chunks around IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        idat = zlib.compress(b"".join(b"\0" + bytes(3 * width) for _ in range(height)))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(chunk(k, d) for k, d in before_idat) + chunk(b"IDAT", idat)
            + b"".join(chunk(k, d) for k, d in after_idat) + chunk(b"IEND", b""))


def ztxt_bomb(key: bytes = b"parameters") -> tuple[bytes, bytes]:
    """A zTXt chunk of ~40 KB that inflates to 40 MB, past PIL's 1 MB limit for one text chunk."""
    import zlib

    return b"zTXt", key + b"\0\0" + zlib.compress(b"a" * (40 * 2**20), 9)


def itxt_bomb() -> tuple[bytes, bytes]:
    import zlib

    return b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(b"a" * (40 * 2**20), 9)


def b64_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def message_of(r) -> str:
    body = r.json()
    if "error" in body:
        return body["error"]["message"]
    detail = body["detail"]
    return detail if isinstance(detail, str) else " ".join(e["msg"] for e in detail)


def test_loopback_server_answers_only_loopback_host_names(client):
    for host in ("localhost", "localhost:7860", "127.0.0.1:80", "[::1]:7860", "LocalHost"):
        assert client.get("/sdapi/v1/progress", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:7860", "localhost.evil.example", "127.0.0.1.nip.io", "x" * 5000):
        r = client.get("/sdapi/v1/progress", headers={"Host": host})
        assert r.status_code == 400, host
        assert "valid: 127.0.0.1, [::1], localhost" in r.json()["detail"] and len(r.json()["detail"]) < 400


def test_allowed_hosts_setting():
    from sdlab.server.auth import host_refusal

    loopback_plus = ServerSettings(allowed_hosts=("sd.example", "[fe80::1]", "fe80::2", "Other.Example:8443"))
    for host in ("sd.example:7860", "[fe80::1]", "[fe80::2]:80", "other.example", "other.example:1"):
        assert host_refusal(host, loopback_plus) is None, host
    assert host_refusal("localhost", loopback_plus) is None and host_refusal("evil.example", loopback_plus)
    assert host_refusal("evil.example", ServerSettings(host="0.0.0.0")) is None  # no list: any name
    listed = ServerSettings(host="0.0.0.0", allowed_hosts=("sd.example",))
    assert host_refusal("sd.example", listed) is None and host_refusal("evil.example", listed)
    assert host_refusal(None, listed) and host_refusal("sd.example:port", listed)
    assert host_refusal("evil.example", ServerSettings(allowed_hosts=("*",))) is None


def test_serve_passes_allowed_hosts_and_refuses_empty_credentials(monkeypatch, capsys):
    import sdlab.server
    from sdlab.cli import main

    served = []
    monkeypatch.setattr(sdlab.server, "serve", served.append)
    assert main(["serve", "--model", "random:tiny", "--allowed-host", "a.example", "--allowed-host", "b"]) == 0
    assert served[0].allowed_hosts == ("a.example", "b")
    assert main(["serve", "--api-key", ""]) == 2 and "api_key is empty" in capsys.readouterr().err
    assert len(served) == 1


@pytest.mark.parametrize("settings", [{"api_key": ""}, {"api_key": "  "}, {"basic_auth": ""},
                                      {"basic_auth": "ann"}, {"basic_auth": ":pw"}, {"basic_auth": "ann:"}])
def test_empty_credentials_are_a_startup_error(settings):
    from sdlab.errors import ParameterError

    with pytest.raises(ParameterError, match="api_key is empty|basic_auth must be 'user:password'"):
        ServerSettings(**settings)


@pytest.mark.parametrize("request_args", [
    {"data": {"a": "b"}},  # a cross-site <form> POST
    {"files": {"f": ("x.txt", b"x")}},  # multipart/form-data
    {"content": b"{}", "headers": {"Content-Type": "text/plain"}},  # fetch(..., {mode: "no-cors", body})
    {"content": b"{}", "headers": {}},  # a Blob without a type: no Content-Type at all
    {"headers": {"Origin": "http://evil.example"}},
    {"headers": {"Origin": "null"}},
    {"headers": {"Origin": "http://localhost:3000"}},  # another local web app is another origin
    {"headers": {"Sec-Fetch-Site": "cross-site"}},
    {"json": {}, "headers": {"Origin": "http://evil.example"}},
])
def test_cross_site_and_form_posts_are_refused(client, request_args, monkeypatch):
    from sdlab.server import a1111

    stopped = []
    monkeypatch.setattr(a1111, "interrupt", lambda request: stopped.append(1))
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/txt2img", "/sdapi/v1/options"):
        r = client.post(path, **request_args)
        assert r.status_code == 403, (path, r.text)
        assert "refused" in r.json()["detail"]


def test_same_origin_and_plain_json_posts_go_through(client):
    for headers in ({}, {"Origin": "http://localhost"}, {"Origin": "http://localhost:80"},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}):
        assert client.post("/sdapi/v1/interrupt", headers=headers).status_code == 200, headers
    assert client.post("/sdapi/v1/interrupt", json={}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", content=json.dumps({"prompt": "x", **SMALL}),
                    headers={"Content-Type": "application/json; charset=utf-8", "Origin": "http://localhost"})
    assert r.status_code == 200


def test_allowed_cors_origin_may_post_and_preflight_without_auth():
    settings = ServerSettings(model="random:tiny", api_key="k", cors_origins=("http://ok.example",))
    c = TestClient(create_app(settings), base_url=LOCAL)  # no lifespan: these routes need no model
    key = {"Authorization": "Bearer k"}
    preflight = {"Access-Control-Request-Method": "POST", "Origin": "http://ok.example"}
    r = c.options("/sdapi/v1/interrupt", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
    assert c.options("/sdapi/v1/interrupt", headers={**preflight, "Origin": "http://evil.example"}).status_code == 401
    assert c.options("/sdapi/v1/interrupt").status_code == 401  # not a preflight
    assert c.post("/sdapi/v1/interrupt", headers={"Origin": "http://ok.example", **key}).status_code == 200
    assert c.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example", **key}).status_code == 403
    assert c.post("/sdapi/v1/interrupt", headers={"Origin": "http://ok.example"}).status_code == 401


def test_options_requests_need_auth_without_cors():
    c = TestClient(create_app(ServerSettings(model="random:tiny", api_key="k")), base_url=LOCAL)
    preflight = {"Access-Control-Request-Method": "POST", "Origin": "http://localhost"}
    for headers in ({}, preflight):
        assert c.options("/sdapi/v1/txt2img", headers=headers).status_code == 401


@pytest.mark.parametrize("path, raw, field", [
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": Infinity}', "steps"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "eta": -Infinity}', "eta"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": 1e999}', "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "width": NaN, "height": "big"}', "width"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "override_settings": {"deepcache": {"n": [NaN]}}}',
     "override_settings.deepcache.n[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": [], "denoising_strength": NaN}', "denoising_strength"),
    ("/v1/images/generations", b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
    ("/v1/images/generations", b'{"prompt": "x", "n": Infinity}', "n"),
])
def test_non_finite_numbers_are_a_clear_4xx(client, path, raw, field):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == (400 if path.startswith("/v1/") else 422), r.text
    json.loads(r.text)  # strict JSON: no NaN in the answer
    assert field in r.text and "finite" in message_of(r)


def test_validation_errors_do_not_echo_huge_input(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "9" * 100 + "x" * 100_000})
    assert r.status_code == 422 and len(r.text) < 500
    assert r.json()["detail"][0]["loc"] == ["body", "steps"] and "input" not in r.json()["detail"][0]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [1] * 10_000})
    assert r.status_code == 422 and len(r.json()["detail"]) <= 20
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "y" * 100_000})
    assert r.status_code == 422 and len(r.text) < 1200 and "characters" in r.json()["detail"]


@pytest.mark.parametrize("png, message", [
    pytest.param(png_with_chunks(4, 4, before_idat=[ztxt_bomb()]), "inflates past the decoder's limit", id="zTXt"),
    pytest.param(png_with_chunks(4, 4, before_idat=[itxt_bomb()]), "inflates past the decoder's limit", id="iTXt"),
    pytest.param(png_with_chunks(4, 4, after_idat=[ztxt_bomb(b"Comment")]), "inflates past the decoder's limit",
                 id="zTXt-after-IDAT"),
    pytest.param(png_with_chunks(4, 4, before_idat=[(b"iCCP", ztxt_bomb()[1])]), "inflates past the decoder's limit",
                 id="iCCP"),
    pytest.param(png_with_chunks(100_000, 100_000, idat=b"x"), "pixels", id="pixels-past-PIL-limit"),
    pytest.param(png_with_chunks(5000, 5000, idat=b"x"), "5000x5000 is larger than", id="pixels-past-server-limit"),
    pytest.param(png_with_chunks(64, 64)[:-40], "truncated", id="truncated"),
    pytest.param(png_with_chunks(8, 8, idat=b"not zlib"), "not a readable image", id="bad-IDAT"),
    pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not a readable image",
                 id="EPS"),  # PIL would hand it to ghostscript
])
def test_image_bombs_and_broken_images_are_422(client, png, message):
    text = b64_bytes(png)
    for path, body, field in (("/sdapi/v1/png-info", {"image": text}, "image"),
                              ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [text]}, "init_images[0]")):
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"].startswith(f"{field}: ") and message in r.json()["detail"], r.text


def test_png_info_parses_in_a_worker_thread_and_bounds_the_text(client, monkeypatch):
    from sdlab.pngmeta import png_bytes
    from sdlab.server import a1111

    started, release = threading.Event(), threading.Event()

    def slow_parse(text):
        started.set()
        release.wait(10)
        return parse_infotext(text)

    monkeypatch.setattr(a1111, "parse_infotext", slow_parse)
    image = b64_bytes(png_bytes(Image.new("RGB", (4, 4)), "a cat\nSteps: 2, Sampler: Euler, Seed: 1"))
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/png-info", json={"image": image})))
    thread.start()
    try:
        assert started.wait(10)
        begin = time.monotonic()
        assert client.get("/sdapi/v1/progress").status_code == 200
        assert time.monotonic() - begin < 5, "the parse held the event loop"
    finally:
        release.set()
        thread.join(30)
    assert answer["r"].json()["parameters"]["Seed"] == "1"
    limit = ServerSettings().max_infotext_chars
    long_text = b64_bytes(png_bytes(Image.new("RGB", (4, 4)), "a" * limit + "\nSteps: 2"))
    r = client.post("/sdapi/v1/png-info", json={"image": long_text})
    assert r.status_code == 422 and f"parses at most {limit}" in r.json()["detail"]


def test_request_bodies_are_bounded():
    assert ServerSettings().body_limit > 3 * 16 * 2**20 * 4 // 3  # three full-size base64 images fit
    c = TestClient(create_app(ServerSettings(model="random:tiny", max_body_bytes=10_000)), base_url=LOCAL)
    big = json.dumps({"prompt": "x" * 20_000}).encode()
    r = c.post("/sdapi/v1/txt2img", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "10000 bytes" in r.json()["detail"]
    chunks = (big[i:i + 1000] for i in range(0, len(big), 1000))  # no Content-Length: counted as it arrives
    r = c.post("/sdapi/v1/txt2img", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = c.post("/v1/images/generations", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [
    pytest.param(b"[" * 100_000, id="arrays"),
    pytest.param(b'{"a":' * 100_000, id="objects"),
    pytest.param(b'{"prompt": "x", "override_settings": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}",
                 id="300-in-override_settings"),  # was a 500: the answer's encoder recursed
])
def test_deeply_nested_json_is_refused_quickly(client, raw):
    begin = time.monotonic()
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "nests deeper than" in r.json()["detail"]
    assert time.monotonic() - begin < 2


def test_json_depth_ignores_brackets_in_strings():
    from sdlab.server.codec import json_depth

    assert json_depth(b'{"a": "[[[{{", "b": [1, {"c": "\\"]]]"}]}') == 3
    assert json_depth(b"[]" * 3_000_000, chunk=2**16) == 1 and json_depth(b"") == 0
