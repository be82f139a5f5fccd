#!/usr/bin/env python
"""Soak test of `sdlab serve` on loopback: many clients for minutes, good and bad requests mixed.

    python scripts/soak_server.py                     # a server on the built-in model, 16 clients, 10 minutes
    python scripts/soak_server.py --minutes 1 --clients 4

It starts the server as its own process (so that its memory can be watched) on a free loopback port, then
runs `--clients` threads until `--minutes` are up, each picking at random (seeded) one of:

- good: a small txt2img from a fixed set of bodies; every answer for the same body must be the same image,
  and the same as the one the server makes for it alone at the end ("wrong image": 0 to pass);
- bad: a malformed request from a corpus (wrong types, NaN, unknown names, paths in names, bad base64, a
  PNG bomb): a 4xx with a JSON body, never a 5xx;
- huge: a request over the cost limit (2048x2048, 16 images): refused with 422 before any work;
- interrupted: a longer job, and an /interrupt a moment later: 200 (the images so far);
- disconnect: a request sent on a raw socket that is closed at once: its job must not hold the worker.

A watcher polls /progress: a job that stays current longer than the server's time limit is a stall (0 to
pass). The server's RSS is sampled every 10 s ("drift": last minus the first sample after warm-up). A
client answered 429 waits Retry-After (at most 2 s) and counts it as "busy". Everything is bounded in count
and time, and only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

GOOD = [{"prompt": f"a {c} {s}", "seed": seed, "width": 64, "height": 64, "steps": 6}
        for seed, (c, s) in enumerate([(c, s) for c in ("red", "blue", "green") for s in ("circle", "square")])]
LONG = {"prompt": "a yellow star", "seed": 7, "width": 128, "height": 128, "steps": 25}  # ~5-10 s
HUGE = {"prompt": "x", "steps": 2, "width": 2048, "height": 2048, "batch_size": 16}
KINDS = {"good": 0.45, "bad": 0.25, "huge": 0.1, "interrupted": 0.1, "disconnect": 0.1}
MAX_JOB_SECONDS = 30  # the server's budget here; its time limit is twice that


def png_bomb() -> str:
    """A 1x1 PNG whose zTXt chunk inflates far past what a reader should accept (64 MB from 64 KB)."""
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    png = buffer.getvalue()
    data = b"parameters\x00\x00" + zlib.compress(b"a" * (64 * 2**20), 9)  # keyword, NUL, method 0, text
    chunk = len(data).to_bytes(4, "big") + b"zTXt" + data + zlib.crc32(b"zTXt" + data).to_bytes(4, "big")
    end_of_ihdr = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    return base64.b64encode(png[:end_of_ihdr] + chunk + png[end_of_ihdr:]).decode()


def bad_requests() -> list[tuple[str, str]]:
    """(route, raw JSON body) pairs that must each get a 4xx."""
    bodies = [
        {"prompt": "x", "steps": "many"}, {"prompt": "x", "width": -64}, {"prompt": "x", "batch_size": 10**9},
        {"prompt": "x", "sampler_name": "nope"}, {"prompt": "x", "scheduler": "../etc"},
        {"prompt": "x <lora:/etc/hostname:1>"}, {"prompt": "x <lora:../../etc/passwd:1>"},
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
        {"prompt": "x" * 100_000}, {"prompt": ["not", "a", "string"]}, {"prompt": "x", "force_task_id": "../x"},
    ]
    raw = [("/sdapi/v1/txt2img", json.dumps(b)) for b in bodies]
    raw += [("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": NaN}'),
            ("/sdapi/v1/txt2img", '{"prompt": "x", "steps": Infinity}'),
            ("/sdapi/v1/txt2img", "[" * 10_000 + "]" * 10_000),
            ("/sdapi/v1/img2img", json.dumps({"prompt": "x", "init_images": ["not base64!"]})),
            ("/sdapi/v1/img2img", json.dumps({"prompt": "x", "init_images": [png_bomb()]})),
            ("/sdapi/v1/png-info", json.dumps({"image": png_bomb()})),
            ("/v1/images/generations", json.dumps({"prompt": "x", "n": 1000}))]
    return raw


@dataclass
class Figures:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # transport errors and timeouts (not our own hang-ups)
    five_xx: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # e.g. a bad request answered 200
    images: dict[int, set[bytes]] = field(default_factory=dict)  # good body index -> pixel bytes seen
    interrupted_answers: int = 0
    busy: int = 0
    stalls: list[str] = field(default_factory=list)
    longest_job_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def pixels(b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


class Soak:
    def __init__(self, url: str, pid: int, seconds: float, clients: int, seed: int):
        self.url, self.pid, self.clients, self.seed = url, pid, clients, seed
        self.end = time.monotonic() + seconds
        self.figures = Figures()
        self.bad = bad_requests()
        self.http = httpx.Client(timeout=httpx.Timeout(4 * MAX_JOB_SECONDS + 60, connect=10),
                                 limits=httpx.Limits(max_connections=2 * clients + 4))

    def post(self, route: str, content: str, kind: str) -> httpx.Response | None:
        """POST, waiting out 429s (Retry-After, at most 2 s) until the soak ends."""
        while True:
            try:
                r = self.http.post(self.url + route, content=content, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as e:
                with self.figures.lock:
                    self.figures.lost.append(f"{kind} {route}: {type(e).__name__}: {e}")
                return None
            with self.figures.lock:
                self.figures.statuses[r.status_code] += 1
                if r.status_code >= 500:
                    self.figures.five_xx.append(f"{kind} {route}: {r.status_code} {r.text[:200]}")
            if r.status_code != 429 or time.monotonic() > self.end:
                return r
            with self.figures.lock:
                self.figures.busy += 1
            time.sleep(min(2.0, float(r.headers.get("Retry-After", 1))))

    # ---- the five kinds ----

    def good(self, rng: random.Random) -> None:
        index = rng.randrange(len(GOOD))
        r = self.post("/sdapi/v1/txt2img", json.dumps(GOOD[index]), "good")
        if r is None or r.status_code == 429:
            return
        if r.status_code != 200:
            return self.note(f"good request {index}: {r.status_code} {r.text[:200]}")
        if json.loads(r.json()["info"])["interrupted"]:  # another client's /interrupt hit this job
            with self.figures.lock:
                self.figures.interrupted_answers += 1
            return
        with self.figures.lock:
            self.figures.images.setdefault(index, set()).add(pixels(r.json()["images"][0]))

    def bad_request(self, rng: random.Random) -> None:
        route, content = rng.choice(self.bad)
        r = self.post(route, content, "bad")
        if r is not None and not 400 <= r.status_code < 500:
            self.note(f"bad request to {route} answered {r.status_code}")

    def huge(self, rng: random.Random) -> None:
        r = self.post("/sdapi/v1/txt2img", json.dumps(HUGE), "huge")
        if r is not None and r.status_code != 422:
            self.note(f"over-budget request answered {r.status_code}: {r.text[:200]}")

    def interrupted(self, rng: random.Random) -> None:
        timer = threading.Timer(rng.uniform(0.2, 2.0), self.interrupt)
        timer.start()
        r = self.post("/sdapi/v1/txt2img", json.dumps(LONG), "interrupted")
        timer.cancel()
        if r is not None and r.status_code not in (200, 429):
            self.note(f"interrupted request answered {r.status_code}: {r.text[:200]}")

    def interrupt(self) -> None:
        try:
            self.http.post(self.url + "/sdapi/v1/interrupt")
        except httpx.HTTPError:
            pass

    def disconnect(self, rng: random.Random) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        body = json.dumps(LONG).encode()
        head = (f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + body)
            time.sleep(rng.uniform(0.0, 1.0))  # hang up before the answer

    def note(self, text: str) -> None:
        with self.figures.lock:
            self.figures.unexpected.append(text)

    # ---- running ----

    def client(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        actions = {"good": self.good, "bad": self.bad_request, "huge": self.huge, "interrupted": self.interrupted,
                   "disconnect": self.disconnect}
        while time.monotonic() < self.end:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            with self.figures.lock:
                self.figures.kinds[kind] += 1
            actions[kind](rng)

    def watch(self) -> None:
        """Stalls (one job current for longer than the time limit) and the server's RSS."""
        current, since, last_rss = None, time.monotonic(), 0.0
        while time.monotonic() < self.end + 5:
            try:
                job = self.http.get(self.url + "/sdapi/v1/progress?skip_current_image=true").json()["state"]["job"]
            except httpx.HTTPError:
                job = current
            now = time.monotonic()
            if job != current:
                current, since = job, now
            elif job:
                held = now - since
                self.figures.longest_job_s = max(self.figures.longest_job_s, held)
                if held > 2 * MAX_JOB_SECONDS and f"job {job}" not in " ".join(self.figures.stalls):
                    self.figures.stalls.append(f"job {job} held the worker for over {2 * MAX_JOB_SECONDS} s")
            if now - last_rss >= 10:
                self.figures.rss_mb.append(rss_mb(self.pid))
                last_rss = now
            time.sleep(0.5)

    def run(self) -> Figures:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        watcher = threading.Thread(target=self.watch, daemon=True)
        for t in (*threads, watcher):
            t.start()
        for t in threads:
            t.join()
        watcher.join()
        self.check_images()
        return self.figures

    def check_images(self) -> None:
        """Each good body, asked alone now, must give the one image every concurrent answer gave."""
        self.wrong = 0
        for index, seen in sorted(self.figures.images.items()):
            r = self.http.post(self.url + "/sdapi/v1/txt2img", json=GOOD[index])
            alone = pixels(r.json()["images"][0])
            self.wrong += sum(1 for image in seen if image != alone)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(model: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen([sys.executable, "-m", "sdlab.cli", "serve", "--model", model, "--port", str(port),
                                "--max-job-seconds", str(MAX_JOB_SECONDS), "--queue-size", "8"],
                               env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/sdapi/v1/progress", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start: " + process.stderr.read()[-2000:])


def report(figures: Figures, wrong: int, seconds: float) -> tuple[str, bool]:
    served = sum(n for status, n in figures.statuses.items() if 200 <= status < 300)
    four = {s: n for s, n in sorted(figures.statuses.items()) if 400 <= s < 500}
    drift = figures.rss_mb[-1] - figures.rss_mb[1] if len(figures.rss_mb) > 2 else 0.0
    ok = not figures.five_xx and not figures.lost and not wrong and not figures.stalls and not figures.unexpected
    lines = [
        f"{sum(figures.kinds.values())} requests in {seconds / 60:.1f} min: " + ", ".join(
            f"{k} {n}" for k, n in figures.kinds.items()),
        f"served (2xx): {served}; 4xx: {sum(four.values())} {four}; 5xx: {len(figures.five_xx)}; "
        f"lost: {len(figures.lost)}; busy (429, retried): {figures.busy}",
        f"good answers interrupted by another client's /interrupt: {figures.interrupted_answers}",
        f"wrong image for its request: {wrong} (of {sum(len(s) for s in figures.images.values())} distinct "
        f"answers to {len(figures.images)} bodies)",
        f"worker stalls over {2 * MAX_JOB_SECONDS} s: {len(figures.stalls)}; longest job {figures.longest_job_s:.1f} s",
        f"server RSS: first {figures.rss_mb[0] if figures.rss_mb else 0:.0f} MB, after warm-up "
        f"{figures.rss_mb[1] if len(figures.rss_mb) > 1 else 0:.0f} MB, last "
        f"{figures.rss_mb[-1] if figures.rss_mb else 0:.0f} MB, max {max(figures.rss_mb, default=0):.0f} MB "
        f"(drift {drift:+.0f} MB)",
    ]
    lines += [f"5xx: {e}" for e in figures.five_xx[:5]] + [f"lost: {e}" for e in figures.lost[:5]]
    lines += [f"unexpected: {e}" for e in figures.unexpected[:5]] + [f"stall: {e}" for e in figures.stalls[:5]]
    lines.append("PASS" if ok else "FAIL")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 60 or not 0 < args.clients <= 64:
        parser.error("at most 60 minutes and 64 clients")
    process, url = start_server(args.model, args.threads)
    try:
        started = time.monotonic()
        soak = Soak(url, process.pid, args.minutes * 60, args.clients, args.seed)
        figures = soak.run()
        text, ok = report(figures, soak.wrong, time.monotonic() - started)
    finally:
        process.terminate()
        process.wait(60)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
