"""Safe reading by content, error reporting, and atomic writes (sdlab.checkpoints.io / .atomic)."""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints import atomic_folder, atomic_write, read_checkpoint, read_state_dict
from sdlab.checkpoints.atomic import DestinationExistsError
from sdlab.checkpoints.io import write_safetensors
from sdlab.errors import CheckpointError


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, 2, generator=g).half(),
    }


def _assert_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]), k


# --- reading by content -----------------------------------------------------------------------------


def test_safetensors_is_recognised_by_content_not_extension(tmp_path):
    path = tmp_path / "model.ckpt"  # a lying extension
    save_file(_tensors(), path, metadata={"prediction_type": "v_prediction"})
    raw = read_checkpoint(path)
    assert raw.format == "safetensors"
    assert raw.metadata == {"prediction_type": "v_prediction"}
    _assert_equal(raw.tensors, _tensors())


def test_torch_zip_checkpoint_named_safetensors_is_unwrapped(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": _tensors(), "global_step": 875000, "epoch": 6}, path)
    raw = read_checkpoint(path)
    assert raw.format == "torch-zip"
    assert raw.metadata["global_step"] == "875000"
    _assert_equal(raw.tensors, _tensors())


def test_legacy_torch_pickle_is_read(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    raw = read_checkpoint(path)
    assert raw.format == "torch-pickle"
    _assert_equal(raw.tensors, _tensors())


def test_non_tensor_entries_are_dropped(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "note": "hello", "step": 3}, path)
    assert list(read_state_dict(path)) == ["w"]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the RSS")
def test_safetensors_is_memory_mapped_not_read_eagerly(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.ones(1024, 1024) for i in range(16)}, path)  # 64 MiB
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    before = rss()
    tensors = read_state_dict(path)
    grown = rss() - before
    assert grown < 16 * 2**20, f"reading grew RSS by {grown / 2**20:.1f} MiB for a 64 MiB file: not mmapped"
    assert float(tensors["w3"].sum()) == 1024 * 1024  # and the data is there when touched


# --- errors -------------------------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.safetensors")


def test_folder_is_not_a_file(tmp_path):
    assert "folder" in _error(tmp_path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "readme.safetensors"
    path.write_text("this is not a checkpoint at all")
    message = _error(path)
    assert "not a checkpoint" in message and "safetensors" in message


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "truncated" in _error(path)


def test_safetensors_header_longer_than_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    assert "truncated" in _error(path)


def test_safetensors_header_not_json(tmp_path):
    path = tmp_path / "m.safetensors"
    header = b"{not json at all}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert "not valid JSON" in _error(path)


def test_safetensors_offsets_inconsistent_with_shape(tmp_path):
    path = tmp_path / "m.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    message = _error(path)
    assert "corrupted" in message and "'w'" in message


def test_truncated_torch_zip(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": _tensors()}, path)
    path.write_bytes(path.read_bytes()[:200])
    assert "corrupted" in _error(path)


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_legacy_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(_CreatesFile(marker), protocol=2))
    message = _error(path)
    assert not marker.exists()
    assert "unsafe" in message


def test_malicious_zip_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callback": _CreatesFile(marker)}, path)
    assert not marker.exists()  # saving does not call it
    message = _error(path)
    assert not marker.exists()
    assert "unsafe" in message


# --- writing ------------------------------------------------------------------------------------------


def test_write_safetensors_round_trip_with_shared_views(tmp_path):
    fused = torch.randn(6, 2)
    q, k, v = fused.chunk(3)  # views of one storage, which safetensors alone refuses
    path = write_safetensors(tmp_path / "m.safetensors", {"q": q, "k": k, "v": v}, {"format": "pt"})
    _assert_equal(read_state_dict(path), {"q": q, "k": k, "v": v})


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": torch.zeros(2)})
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        write_safetensors(path, {"w": torch.ones(2)})
    assert torch.equal(read_state_dict(path)["w"], torch.zeros(2))
    write_safetensors(path, {"w": torch.ones(2)}, overwrite=True)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half of it")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, overwrite=True) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_atomic_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (folder / "a.txt").read_text() == "1"
    with pytest.raises(DestinationExistsError):
        with atomic_folder(folder) as tmp:
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(folder, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("crash")
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]
    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries left behind
