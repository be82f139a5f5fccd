"""Running the app under uvicorn, with a clean stop on SIGTERM / Ctrl-C.

On the signal, the job queue stops taking jobs and cancels the waiting ones (their requests get 503) at
once, while the running job gets `shutdown_grace_s` to finish before it is aborted (between two network
blocks, within about a second); uvicorn meanwhile stops accepting connections and waits for the open
requests, then the process exits with status 0, within `shutdown_grace_s` + a few seconds in any state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from .app import create_app
from .settings import ServerSettings

log = logging.getLogger(__name__)

EXIT_MARGIN_S = 3  # after the grace, how long open requests get to hear that their job was stopped


class _Server(uvicorn.Server):
    """uvicorn's server, telling the job queue to wind down as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        # Runs inside a signal handler: hand the work to a thread.
        threading.Thread(target=self._on_exit, name="sdlab-shutdown", daemon=True).start()
        # As uvicorn's own handler, except that the signal is not recorded to be re-raised after the
        # graceful shutdown: a completed shutdown exits with status 0. A second Ctrl-C forces the exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(settings: ServerSettings) -> None:
    if not settings.is_loopback and not (settings.api_key or settings.basic_auth):
        log.warning("listening on %s without authentication: anyone who can reach this port can use it; "
                    "set an API key (--api-key / SDLAB_API_KEY)", settings.host)
    app = create_app(settings)
    state = app.state.sdlab
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + EXIT_MARGIN_S)
    _Server(config, state.begin_shutdown).run()
    if state.queue.worker_alive():
        # Only a step that cannot be stopped part-way (reading a model file) is still running. Exiting now
        # without waiting for it is safe (nothing is being written), and skipping the interpreter's
        # teardown keeps it from destroying a thread that is inside torch (a C++ abort).
        log.warning("the worker is still busy (%s); exiting without waiting for it", state.queue.current_kind())
        logging.shutdown()
        os._exit(0)


@contextlib.contextmanager
def serve_in_thread(settings: ServerSettings, start_timeout: float = 60.0) -> Iterator[str]:
    """Run the server in a background thread (for tests, notebooks, load tests); yield its base URL.
    `settings.port` 0 picks a free port."""
    port = settings.port or _free_port(settings.host)
    settings = dataclasses.replace(settings, port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="sdlab-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {settings.host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(settings.shutdown_grace_s + 30)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
