"""A corpus of bad requests to every route of the HTTP server. Each must get a clear 4xx whose JSON body has
a one-line message (no traceback, nothing read from a file), and the server must stay healthy after each.
One app (the tiny random model) serves the whole module; its upload limit is small so that the size cases
stay cheap."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdlab.pngmeta import png_bytes
from sdlab.server import ServerSettings, create_app

SMALL = {"width": 32, "height": 32, "steps": 1}
UPLOAD_LIMIT = 2**20  # bytes of one decoded image; the body limit follows (about 5 MB)
SECRET = "sdlab-secret-file-content-7f3a"  # written into a file that requests try to name
# Stand-ins in the requests for the secret file's path, with and without its suffix (test ids must not vary)
SECRET_FILE, SECRET_STEM = "@secret-file@", "@secret-stem@"


@dataclass(frozen=True)
class Bad:
    """One bad request: `body` is sent as JSON, `raw` as bytes (application/json unless headers say else)."""

    method: str
    path: str
    body: object = None
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)
    form: dict | None = None
    status: tuple[int, ...] = ()  # the expected status codes (any 4xx when empty)

    def send(self, client: TestClient, secret: Path):
        kwargs: dict = {"headers": dict(self.headers)}
        if self.form is not None:
            kwargs["data"] = self.form
        elif self.raw is not None:
            kwargs["content"] = self.raw
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif self.body is not None:
            text = json.dumps(self.body).replace(SECRET_FILE, str(secret)).replace(SECRET_STEM, str(secret.parent
                                                                                                  / secret.stem))
            kwargs["content"] = text.encode()
            kwargs["headers"].setdefault("Content-Type", "application/json")
        return client.request(self.method, self.path, **kwargs)


# ---- images ----


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, extra=(), idat: bytes | None = None) -> str:
    """A base64 RGB PNG whose header declares width x height, with `extra` chunks before its pixels."""
    if idat is None:
        idat = zlib.compress(b"".join(b"\0" + bytes(3 * width) for _ in range(height)))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + b"".join(_chunk(k, d) for k, d in extra) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return base64.b64encode(data).decode()


BOMB_TEXT = zlib.compress(b"a" * (40 * 2**20), 9)  # 40 KB that inflate to 40 MB, past PIL's 1 MB per chunk
IMAGES = {
    "invalid base64": "not base64!",
    "not an image": base64.b64encode(b"just some bytes").decode(),
    "data URL of junk": "data:image/png;base64," + base64.b64encode(b"junk").decode(),
    "pixel bomb": _png(100_000, 100_000, idat=b"x"),
    "too many pixels": _png(5000, 5000, idat=b"x"),
    "zTXt bomb": _png(4, 4, [(b"zTXt", b"parameters\0\0" + BOMB_TEXT)]),
    "iTXt bomb": _png(4, 4, [(b"iTXt", b"parameters\0\1\0\0\0" + BOMB_TEXT)]),
    "iCCP bomb": _png(4, 4, [(b"iCCP", b"icc\0\0" + BOMB_TEXT)]),
    "truncated PNG": _png(64, 64)[:-80],
    "over the upload limit": base64.b64encode(bytes(UPLOAD_LIMIT + 1)).decode(),
    "EPS (PIL would run ghostscript)": base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n").decode(),
}


def _long_infotext_png() -> str:
    image = png_bytes(Image.new("RGB", (4, 4)), "a" * 40_000 + "\nSteps: 2, Sampler: Euler, Seed: 1")
    return base64.b64encode(image).decode()


# ---- the corpus ----

TXT2IMG, IMG2IMG, PNG_INFO = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info"
OPTIONS, OPENAI = "/sdapi/v1/options", "/v1/images/generations"
GENERATION_ROUTES = (TXT2IMG, IMG2IMG, OPENAI)
MB_TEXT = "x" * 2**20
NESTED = b"[" * 100_000
NAMES = ("..", "../x", "../../etc/passwd", "/etc/passwd", "a/b", "..\\x", "C:\\x", "x\0y")
FORM_ROUTES = ("/sdapi/v1/interrupt", "/sdapi/v1/skip", TXT2IMG, IMG2IMG, PNG_INFO, OPTIONS, OPENAI)


def _txt2img(**fields) -> dict:
    return {"prompt": "x", **SMALL, **fields}


def _img2img(image: str, **fields) -> dict:
    return {"prompt": "x", **SMALL, "init_images": [image], **fields}


def _corpus() -> dict[str, Bad]:
    good_image = _png(32, 32)
    cases: dict[str, Bad] = {}

    def add(name: str, *args, **kwargs) -> None:
        assert name not in cases, name
        cases[name] = Bad(*args, **kwargs)

    # wrong types and bodies that are not an object
    for route, fields in ((TXT2IMG, _txt2img()), (IMG2IMG, _img2img(good_image)), (OPENAI, {"prompt": "x"})):
        for key, value in (("prompt", 5), ("steps", "many"), ("seed", "lucky"), ("batch_size", [1]),
                           ("cfg_scale", {"a": 1}), ("width", "wide")):
            if route == OPENAI and key in ("batch_size", "width"):
                key = "n" if key == "batch_size" else "size"
            add(f"{route} {key}={value!r}", "POST", route, {**fields, key: value})
        for raw in (b"{", b"[1, 2]", b'"x"', b"null", b"", b"\xff\xfe", b'{"prompt": "x"}{}'):
            add(f"{route} body {raw[:10]!r}", "POST", route, raw=raw)
    add("txt2img override_settings not a dict", "POST", TXT2IMG, _txt2img(override_settings="x"))
    add("txt2img send_images not a bool", "POST", TXT2IMG, _txt2img(send_images="maybe"))
    add("img2img init_images not a list", "POST", IMG2IMG, _img2img(good_image) | {"init_images": good_image})
    add("img2img init_images of numbers", "POST", IMG2IMG, _img2img(good_image) | {"init_images": [5]})
    add("img2img no init image", "POST", IMG2IMG, _img2img(good_image) | {"init_images": []})
    add("img2img mask_invert a word", "POST", IMG2IMG, _img2img(good_image, inpainting_mask_invert="yes"))
    add("png-info no image", "POST", PNG_INFO, {})
    add("png-info image a number", "POST", PNG_INFO, {"image": 5})
    add("options a list", "POST", OPTIONS, raw=b"[]")
    add("progress skip_current_image a word", "GET", "/sdapi/v1/progress?skip_current_image=maybe")

    # NaN and infinities, raw in the JSON (Python's parser reads them)
    for key in ("cfg_scale", "steps", "width", "seed", "eta", "batch_size"):
        for token in ("NaN", "Infinity", "-Infinity", "1e999"):
            add(f"txt2img {key}={token}", "POST", TXT2IMG, raw=f'{{"prompt": "x", "{key}": {token}}}'.encode())
    for token in ("NaN", "Infinity"):
        add(f"img2img denoising_strength={token}", "POST", IMG2IMG,
            raw=f'{{"prompt": "x", "init_images": [], "denoising_strength": {token}}}'.encode())
        add(f"txt2img override_settings {token}", "POST", TXT2IMG,
            raw=f'{{"prompt": "x", "override_settings": {{"token_merging_ratio": {token}}}}}'.encode())
        add(f"openai n={token}", "POST", OPENAI, raw=f'{{"prompt": "x", "n": {token}}}'.encode())
        add(f"openai cfg_scale={token}", "POST", OPENAI, raw=f'{{"prompt": "x", "cfg_scale": {token}}}'.encode())
        add(f"options sd_model_checkpoint={token}", "POST", OPTIONS,
            raw=f'{{"sd_model_checkpoint": {token}}}'.encode())

    # huge and negative sizes, steps, batches, seeds
    for key, values in (("width", (0, -64, 10**6, 2**64)), ("height", (-8, 10**9)), ("steps", (0, -1, 10**9)),
                        ("batch_size", (0, -1, 10**6)), ("n_iter", (0, -5, 10**9)), ("seed", (-2, 2**64, 2**200)),
                        ("cfg_scale", (-1, 1e308)), ("eta", (-1.0, 1e9))):
        for value in values:
            add(f"txt2img {key}={value}", "POST", TXT2IMG, _txt2img(**{key: value}))
    add("txt2img width with 5000 digits", "POST", TXT2IMG, raw=b'{"prompt": "x", "width": 1' + b"0" * 5000 + b"}")
    add("txt2img clip_skip huge", "POST", TXT2IMG, _txt2img(override_settings={"CLIP_stop_at_last_layers": 10**9}))
    add("txt2img deepcache negative", "POST", TXT2IMG, _txt2img(override_settings={"deepcache": -3}))
    for value in (-0.5, 2.0, 1e300):
        add(f"img2img denoising_strength={value}", "POST", IMG2IMG, _img2img(good_image, denoising_strength=value))
    for value in (0, -1, 11, 10**9):
        add(f"openai n={value}", "POST", OPENAI, {"prompt": "x", "n": value})
    for size in ("big", "0x0", "-64x64", "100000x100000", "64x64x64", "64", "x" * 10_000):
        add(f"openai size={size[:20]}", "POST", OPENAI, {"prompt": "x", "size": size})
    add("openai steps huge", "POST", OPENAI, {"prompt": "x", "steps": 10**9, "size": "32x32"})
    add("openai response_format url", "POST", OPENAI, {"prompt": "x", "response_format": "url"})
    add("openai no prompt", "POST", OPENAI, {"n": 1})

    # 1 MB prompts (the body limit is about 5 MB here), and a body past it
    add("txt2img 1 MB prompt", "POST", TXT2IMG, _txt2img(prompt=MB_TEXT))
    add("txt2img 1 MB negative prompt", "POST", TXT2IMG, _txt2img(negative_prompt=MB_TEXT))
    add("img2img 1 MB prompt", "POST", IMG2IMG, _img2img(good_image, prompt=MB_TEXT))
    add("openai 1 MB prompt", "POST", OPENAI, {"prompt": MB_TEXT})
    add("txt2img 6 MB body", "POST", TXT2IMG, _txt2img(prompt="x" * 6 * 2**20), status=(413,))

    # deeply nested JSON
    for route in (TXT2IMG, IMG2IMG, PNG_INFO, OPTIONS, OPENAI):
        add(f"{route} 100000 [", "POST", route, raw=NESTED)
    add("txt2img nested override_settings", "POST", TXT2IMG,
        raw=b'{"prompt": "x", "override_settings": {"a": ' + b"[" * 500 + b"]" * 500 + b"}}")
    add("txt2img nested unknown field", "POST", TXT2IMG, raw=b'{"prompt": "x", "z": ' + b'{"a":' * 900 + b"1"
        + b"}" * 900 + b"}")

    # bad images
    for name, image in IMAGES.items():
        add(f"img2img {name}", "POST", IMG2IMG, _img2img(image))
        add(f"img2img mask {name}", "POST", IMG2IMG, _img2img(good_image, mask=image))
        add(f"png-info {name}", "POST", PNG_INFO, {"image": image})
    add("png-info 40000-character parameters", "POST", PNG_INFO, {"image": _long_infotext_png()})

    # unknown names, and paths in every name field
    add("txt2img unknown sampler", "POST", TXT2IMG, _txt2img(sampler_name="Bogus"))
    add("txt2img unknown sampler_index", "POST", TXT2IMG, _txt2img(sampler_index="Bogus 2"))
    add("txt2img unknown scheduler", "POST", TXT2IMG, _txt2img(scheduler="weird"))
    add("txt2img unknown model", "POST", TXT2IMG, _txt2img(override_settings={"sd_model_checkpoint": "nope"}))
    add("options unknown model", "POST", OPTIONS, {"sd_model_checkpoint": "nope"})
    add("openai unknown model", "POST", OPENAI, {"prompt": "x", "model": "nope"})
    for name in (*NAMES, SECRET_FILE):
        add(f"txt2img model {name!r}", "POST", TXT2IMG, _txt2img(override_settings={"sd_model_checkpoint": name}))
        add(f"options model {name!r}", "POST", OPTIONS, {"sd_model_checkpoint": name})
        add(f"openai model {name!r}", "POST", OPENAI, {"prompt": "x", "model": name, "size": "32x32", "steps": 1})
        add(f"txt2img sampler {name!r}", "POST", TXT2IMG, _txt2img(sampler_name=name))
        add(f"txt2img scheduler {name!r}", "POST", TXT2IMG, _txt2img(scheduler=name))
        add(f"txt2img force_task_id {name!r}", "POST", TXT2IMG, _txt2img(force_task_id=name))
    for name in ("../x", "/etc/hostname", "/etc/passwd", SECRET_FILE, SECRET_STEM):
        add(f"txt2img lora {name!r}", "POST", TXT2IMG, _txt2img(prompt=f"a cat <lora:{name}:1>"))
        add(f"openai lora {name!r}", "POST", OPENAI, {"prompt": f"<lora:{name}:0.5> a cat", "size": "32x32",
                                                     "steps": 1})

    # unknown fields: ignored by the generation routes (A1111 clients send many), refused by /options
    add("options unknown option", "POST", OPTIONS, {"outdir_samples": "/tmp"})
    add("options unknown and known", "POST", OPTIONS, {"sd_model_checkpoint": "random:tiny", "samples_save": True})

    # job routes
    for job in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "x" * 5000):
        add(f"job {job[:20]}", "GET", f"/sdlab/v1/jobs/{job}", status=(404,))
        add(f"job steps {job[:20]}", "GET", f"/sdlab/v1/jobs/{job}/steps?format=gif", status=(404,))
    add("job preview a word", "GET", "/sdlab/v1/jobs/nope?preview=maybe", status=(422,))
    add("no such route", "GET", "/sdapi/v1/nothing-here", status=(404,))
    add("txt2img with GET", "GET", TXT2IMG, status=(405,))
    add("txt2img with PUT", "PUT", TXT2IMG, _txt2img(), status=(405,))

    # wrong Host, cross-site posts, bodies that are not JSON
    for route in ("/sdapi/v1/progress", TXT2IMG, OPENAI, "/"):
        method = "GET" if route in ("/sdapi/v1/progress", "/") else "POST"
        for host in ("evil.example", "127.0.0.1.evil.example:7860", "x" * 3000):
            add(f"{method} {route} Host {host[:30]}", method, route, _txt2img() if method == "POST" else None,
                headers={"Host": host}, status=(400,))
    for route in FORM_ROUTES:
        add(f"{route} form", "POST", route, form={"prompt": "x"}, status=(403,))
        add(f"{route} text/plain", "POST", route, raw=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"},
            status=(403,))
        add(f"{route} multipart", "POST", route, raw=b"--b\r\n\r\nx\r\n--b--",
            headers={"Content-Type": "multipart/form-data; boundary=b"}, status=(403,))
        add(f"{route} cross-site JSON", "POST", route, _txt2img(), headers={"Origin": "http://evil.example"},
            status=(403,))
        add(f"{route} Sec-Fetch-Site cross-site", "POST", route, _txt2img(),
            headers={"Sec-Fetch-Site": "cross-site"}, status=(403,))
    return cases


CASES = _corpus()


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.safetensors"
    path.write_text(SECRET)  # not a safetensors file: a reader that quotes its header would leak it
    return path


@pytest.fixture(scope="module")
def client():
    settings = ServerSettings(model="random:tiny", max_upload_bytes=UPLOAD_LIMIT)
    with TestClient(create_app(settings), base_url="http://localhost", raise_server_exceptions=False) as c:
        yield c


HOSTNAMES = {socket.gethostname(), Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists()
             else ""} - {""}
FORBIDDEN = [SECRET, "root:x:0:0", "Traceback", 'File "', *(name for name in HOSTNAMES if len(name) >= 6)]


def _message(body: dict) -> str:
    if "error" in body:
        return body["error"]["message"]
    detail = body["detail"]
    if isinstance(detail, str):
        return detail
    assert isinstance(detail, list) and detail, detail
    for error in detail:
        assert set(error) == {"type", "loc", "msg"}, error  # pydantic's `input` is never echoed
        assert "\n" not in error["msg"], error
    return detail[0]["msg"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_a_clear_4xx_and_the_server_stays_healthy(client, secret, name):
    bad = CASES[name]
    r = bad.send(client, secret)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert not bad.status or r.status_code in bad.status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    message = _message(json.loads(r.text, parse_constant=_refuse_constant))
    assert message and "\n" not in message and len(message) <= 1100, message[:300]
    for text in FORBIDDEN:
        assert text not in r.text, f"the answer contains {text!r}"
    if "<lora:" in str(bad.body):  # a short host name ("vm") is looked for as a word of the message
        for host in HOSTNAMES:
            assert not re.search(rf"(?<![\w-]){re.escape(host)}(?![\w-])", message), message
    assert len(r.content) < 20_000, "an error answer should not carry the request back"
    _assert_healthy(client, generate=bad.path in GENERATION_ROUTES)


def _refuse_constant(token: str):
    raise AssertionError(f"{token} in the answer: not JSON")


def _assert_healthy(client: TestClient, generate: bool) -> None:
    assert client.get("/sdapi/v1/progress").status_code == 200
    if generate:  # the routes that queue work: the worker must still run a job
        r = client.post(TXT2IMG, json={"prompt": "ok", "seed": 1, **SMALL})
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text[:300]


def test_unknown_fields_are_ignored_by_the_generation_routes(client):
    body = {**_txt2img(seed=3), "hr_scale": 2, "alwayson_scripts": {"x": {"args": [1, {"a": None}]}}}
    assert client.post(TXT2IMG, json=body).status_code == 200
    raw = json.dumps(_txt2img(seed=3))[:-1] + ', "unused": NaN}'
    assert client.post(TXT2IMG, content=raw, headers={"Content-Type": "application/json"}).status_code == 200
    r = client.post(IMG2IMG, json={**_img2img(_png(32, 32)), "resize_mode": 1, "script_args": []})
    assert r.status_code == 200


def test_a_real_pngs_metadata_still_reads(client):
    r = client.post(TXT2IMG, json=_txt2img(seed=5))
    info = client.post(PNG_INFO, json={"image": r.json()["images"][0]})
    assert info.status_code == 200 and info.json()["parameters"]["Seed"] == "5"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    r = client.post(PNG_INFO, json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["parameters"] == {}
