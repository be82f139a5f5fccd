"""`sdlab serve` as a real process: it answers on loopback, and SIGTERM stops it cleanly (exit 0) after
cancelling the waiting job and stopping the running one within the grace time."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


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


def test_sigterm_cancels_jobs_and_exits_cleanly():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlab.cli", "serve", "--model", "random:tiny", "--port", str(port), "--grace", "1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"{base}/sdapi/v1/samplers", process)
        answers = {}
        long_job = {"prompt": "x", "width": 32, "height": 32, "steps": 1000, "seed": 1}

        def ask(name):
            answers[name] = httpx.post(f"{base}/sdapi/v1/txt2img", json=long_job, timeout=60)

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("running", "waiting")]
        threads[0].start()
        while httpx.get(f"{base}/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
            time.sleep(0.05)
        threads[1].start()
        while httpx.get(f"{base}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
            time.sleep(0.05)
        started = time.time()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.time() - started < 15
        for t in threads:
            t.join(10)
        assert answers["waiting"].status_code == 503 and "shut down" in answers["waiting"].json()["detail"]
        assert answers["running"].status_code == 503  # stopped after the 1 s grace, not left half-done
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
