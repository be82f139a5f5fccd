"""A small run of scripts/load_test.py: concurrent clients against a real uvicorn server on loopback; every
request gets its own image or a 429, never a 5xx, and every image equals the serial run's."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_concurrent_clients_get_their_own_images_or_429(load_test):
    with load_test.local_server("random:tiny", queue_size=3) as url:
        report = load_test.run_load_test(url, clients=6, requests=12, size=32, steps=1, deadline_s=120)
    print(report.summary())
    assert set(report.statuses) <= {200, 429}, report.summary()
    assert report.statuses[200] >= 4  # the running job and the 3 queue places, at least
    assert report.mismatched == [], report.summary()
    assert report.ok


def test_refuses_non_loopback_targets(load_test):
    with pytest.raises(SystemExit, match="only loopback"):
        load_test.check_loopback("http://example.com:7860")
