#!/usr/bin/env python
"""Load test of `sdlab serve` on loopback: many concurrent clients, bounded in count and time.

    python scripts/load_test.py                       # starts a server on random:tiny, 16 clients, 64 requests
    python scripts/load_test.py --url http://127.0.0.1:7860 --size 64

Each request asks for one small image with its own seed. Passing means: every request got either its image
(200) or a 429 (queue full), never a 5xx or a transport error; and every image equals the one the same
server makes for the same seed when asked serially afterwards (so under concurrency no request got
another's image). Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Outcome:
    seed: int
    status: int | None  # None: a transport error or timeout
    seconds: float
    png: bytes | None = None
    error: str | None = None
    retries: int = 0  # 429s answered before this outcome (with --retry)
    retry_after: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome]
    seconds: float
    mismatched: list[int] = field(default_factory=list)

    @property
    def statuses(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return set(self.statuses) <= {200, 429} and not self.mismatched and self.statuses[200] > 0

    def summary(self) -> str:
        done = [o.seconds for o in self.outcomes if o.status == 200]
        lines = [f"{len(self.outcomes)} requests in {self.seconds:.1f} s: "
                 + ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items(), key=str))]
        if done:
            q = statistics.quantiles(done, n=20) if len(done) > 1 else [done[0]] * 19
            lines.append(f"latency of 200s: p50 {statistics.median(done):.2f} s, p95 {q[18]:.2f} s, "
                         f"max {max(done):.2f} s; {len(done) / self.seconds:.2f} images/s")
        retried = sum(o.retries for o in self.outcomes)
        if retried:
            lines.append(f"429s answered and retried: {retried}")
        lines.append(f"images differing from the serial run: {len(self.mismatched)}"
                     + (f" (seeds {self.mismatched[:10]})" if self.mismatched else ""))
        errors = [o.error for o in self.outcomes if o.error][:3]
        lines += [f"error: {e}" for e in errors]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def request_body(seed: int, size: int, steps: int) -> dict:
    return {"prompt": f"a red circle, request {seed}", "seed": seed, "width": size, "height": size,
            "steps": steps}


def one_request(client: httpx.Client, url: str, body: dict) -> Outcome:
    started = time.perf_counter()
    try:
        r = client.post(f"{url}/sdapi/v1/txt2img", json=body)
    except httpx.HTTPError as e:
        return Outcome(body["seed"], None, time.perf_counter() - started, error=f"{type(e).__name__}: {e}")
    outcome = Outcome(body["seed"], r.status_code, time.perf_counter() - started)
    outcome.retry_after = r.headers.get("Retry-After")
    if r.status_code == 200:
        outcome.png = base64.b64decode(r.json()["images"][0])
    elif r.status_code != 429:
        outcome.error = f"{r.status_code}: {r.text[:200]}"
    return outcome


def patient_request(client: httpx.Client, url: str, body: dict, give_up_at: float) -> Outcome:
    """`one_request`, retried after each 429 (waiting its Retry-After, at most 2 s) until `give_up_at`."""
    retries = 0
    while True:
        outcome = one_request(client, url, body)
        if outcome.status != 429 or time.perf_counter() > give_up_at:
            outcome.retries = retries
            return outcome
        retries += 1
        time.sleep(min(2.0, float(outcome.retry_after or 1)))


def run_load_test(url: str, *, clients: int = 16, requests: int = 64, size: int = 32, steps: int = 2,
                  deadline_s: float = 300.0, headers: dict | None = None, retry: bool = False) -> Report:
    """Fire `requests` requests from `clients` threads, then re-ask serially for each image received. With
    `retry`, a client answered 429 waits and asks again (until `deadline_s` from the start)."""
    check_loopback(url)
    bodies = [request_body(seed, size, steps) for seed in range(requests)]
    timeout = httpx.Timeout(deadline_s, connect=10)
    started = time.perf_counter()
    with httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=clients)) as client:
        with ThreadPoolExecutor(clients) as pool:
            give_up_at = started + deadline_s
            ask = (lambda b: patient_request(client, url, b, give_up_at)) if retry else (
                lambda b: one_request(client, url, b))
            outcomes = list(pool.map(ask, bodies))
        report = Report(outcomes, time.perf_counter() - started)
        for outcome in outcomes:
            if outcome.status == 200:
                serial = one_request(client, url, bodies[outcome.seed])
                if serial.png is None or _pixels(serial.png) != _pixels(outcome.png):
                    report.mismatched.append(outcome.seed)
    return report


def _pixels(png: bytes) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses ({', '.join(LOOPBACK)})")


# ---- a server in this process, for the default run and the pytest version ----


@contextlib.contextmanager
def local_server(model: str = "random:tiny", queue_size: int = 8):
    """Run `sdlab serve` in a background thread on a free loopback port; yield its URL."""
    from sdlab.server import ServerSettings, serve_in_thread

    with serve_in_thread(ServerSettings(model=model, port=0, queue_size=queue_size)) as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback); default: start one on --model")
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds any one request may take")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    parser.add_argument("--retry", action="store_true", help="after a 429, wait Retry-After and ask again")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server started here")
    args = parser.parse_args(argv)
    if args.requests > 1000 or args.clients > 64:
        parser.error("at most 1000 requests and 64 clients")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    options = {"clients": args.clients, "requests": args.requests, "size": args.size, "steps": args.steps,
               "deadline_s": args.deadline, "headers": headers, "retry": args.retry}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.url:
        report = run_load_test(args.url, **options)
    else:
        with local_server(args.model, args.queue_size) as url:
            report = run_load_test(url, **options)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
