"""`sdlab serve` as a real process: SIGTERM stops it cleanly, with exit status 0 within the grace time and
a few seconds, in every state: idle, sampling, decoding a large image, and loading a model. The waiting
job is cancelled and the running one stopped (both answered 503), and nothing aborts on the way out
(before: "CancelledError: ... graceful shutdown exceeded" and a C++ "terminate called ...")."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

GRACE = 1
EXIT_WITHIN = GRACE + 6  # the grace, the stop between two network blocks, the answers, process exit
SLOW_LOAD = """
import sys, time
import sdlab.model
load = sdlab.model.Model.from_name.__func__
def slow(cls, *args, **kwargs):
    print("LOADING", file=sys.stderr, flush=True)
    time.sleep(120)  # a model on a slow disk: nothing can stop a read part-way
    return load(cls, *args, **kwargs)
sdlab.model.Model.from_name = classmethod(slow)
import sdlab.cli
sys.exit(sdlab.cli.main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def start_server(port: int, model: str, *, slow_load: bool = False) -> subprocess.Popen:
    program = ["-c", SLOW_LOAD] if slow_load else ["-m", "sdlab.cli"]
    return subprocess.Popen(
        [sys.executable, *program, "serve", "--model", model, "--port", str(port), "--grace", str(GRACE),
         "--max-job-seconds", "100000", "-v"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def progress(base: str) -> dict:
    return httpx.get(f"{base}/sdapi/v1/progress?skip_current_image=true").json()["state"]


JOBS = {  # what runs when the signal arrives, and how to know that it does
    "sampling": ({"prompt": "x", "width": 32, "height": 32, "steps": 1000, "seed": 1},
                 lambda state: state["sampling_step"] > 0),
    # 1 step at 1024x1024 on the built-in model: seconds in the VAE decoder once the step is done
    "decoding": ({"prompt": "x", "width": 1024, "height": 1024, "steps": 1, "cfg_scale": 1, "seed": 1},
                 lambda state: state["sampling_step"] == 1),
}


def stop_and_check(process, answers=None, threads=()) -> None:
    started = time.time()
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=60)
    took = time.time() - started
    for t in threads:
        t.join(10)
    err = process.stderr.read()
    assert status == 0, err[-3000:]
    assert took < EXIT_WITHIN, f"exit took {took:.1f} s\n{err[-3000:]}"
    for bad in ("Traceback", "terminate called", "CancelledError"):
        assert bad not in err, err[-3000:]


@pytest.mark.parametrize("state", ["idle", "sampling", "decoding", "loading"])
def test_sigterm_exits_cleanly_in_every_state(state):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model = "random:tiny" if state in ("idle", "sampling") else "builtin"
    process = start_server(port, model, slow_load=state == "loading")
    try:
        if state == "loading":
            while "LOADING" not in process.stderr.readline():
                assert process.poll() is None
            return stop_and_check(process)
        wait_ready(f"{base}/sdapi/v1/samplers", process)
        if state == "idle":
            return stop_and_check(process)
        body, running = JOBS[state]
        answers = {}

        def ask(name):
            answers[name] = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=120)

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("running", "waiting")]
        threads[0].start()
        while not running(progress(base)):
            time.sleep(0.02)
        threads[1].start()
        while progress(base)["job_count"] < 2:
            time.sleep(0.02)
        stop_and_check(process, answers, threads)
        assert answers["waiting"].status_code == 503 and "shut down" in answers["waiting"].json()["detail"]
        assert answers["running"].status_code == 503  # stopped after the grace, not left half-done
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
