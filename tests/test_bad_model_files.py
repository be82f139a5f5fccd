"""A corpus of bad model files and folders: each must give one clear `CheckpointError`.

Every case is built small in tmp_path and goes through `sdlab.load`, `sdlab info` (`sdlab.cli.main`) and, where
the file itself is broken, `sdlab.checkpoints.read_checkpoint`. Each must raise `CheckpointError` (not a raw
TypeError/IndexError/... traceback) whose message is one line, names the file, and never quotes the file's
content: wherever a case can carry text, it carries `SECRET`, no part of which may reach a message. Nothing may
hang (FIFOs, devices) or allocate without bound (zip bombs, absurd sizes in configs): an alarm fails a test
that runs too long, and the memory cases check the peak RSS.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import sdlab
from sdlab.checkpoints import diffusers_to_ldm, read_checkpoint
from sdlab.checkpoints.io import write_safetensors
from sdlab.cli import main
from sdlab.config import SD15, TINY, TextEncoderConfig, UNetConfig, VAEConfig
from sdlab.errors import CheckpointError

SECRET = "SECRET-c0ntent!"  # '!' is outside the characters a tensor name may show in a message
COMPONENTS = ("unet", "vae", "text_encoder")
# Small enough to write in milliseconds, but detectable from shapes alone (SD 1.x: 8 heads, 32 groups,
# 64-wide text heads, the 49408-token CLIP vocabulary that pads with token 49407).
SMALL_SD1 = SD15.replace(
    name="sd1-custom",
    text_encoder=TextEncoderConfig(width=64, num_layers=1, num_heads=1, mlp_width=64),
    unet=UNetConfig(channels=(32, 64), attention_levels=(True, False), layers_per_block=1, context_dim=64),
    vae=VAEConfig(channels=(32, 32), layers_per_block=1),
)
MiB = 2**20


@dataclasses.dataclass
class Base:
    single: Path  # a valid tiny single file (sdlab's, with its config in the metadata)
    folder: Path  # a valid tiny diffusers folder
    ldm: dict[str, torch.Tensor]  # a valid original-layout state dict that detection reads (no metadata)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("base")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = sdlab.Model.build(TINY)
        small = sdlab.Model.build(SMALL_SD1)
    single = tiny.save(root / "tiny.safetensors", layout="single-file")
    folder = tiny.save(root / "tiny", layout="diffusers")
    ldm = diffusers_to_ldm({n: getattr(small, n).state_dict() for n in COMPONENTS}, SMALL_SD1)
    return Base(single, folder, {k: v.half() for k, v in ldm.items()})


@pytest.fixture(autouse=True)
def _deadline():
    """Fail (rather than hang the suite) if a case blocks, e.g. on a FIFO."""
    def expired(signum, frame):
        raise TimeoutError("a bad model file took more than 30 s to refuse")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


# --- the corpus: name -> (builder(tmp_path, base) -> path, kind) ------------------------------------------
# kind "file": the file itself is broken, so read_checkpoint refuses it too; "model": a readable tensor file
# or folder whose model is wrong; "folder": a diffusers folder that is broken.

CASES: dict[str, tuple] = {}
SHORT_LIVED: list[Path] = []  # folders made outside tmp_path, removed after each test


def case(name: str, kind: str):
    def register(builder):
        CASES[name] = (builder, kind)
        return builder

    return register


def write_st(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file from a header (dict, or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(shape, begin, end, **extra) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end], **extra}


# single files: not a checkpoint at all


@case("empty-file", "file")
def _(tmp, base):
    (tmp / "m.safetensors").write_bytes(b"")
    return tmp / "m.safetensors"


@case("five-bytes", "file")
def _(tmp, base):
    (tmp / "m.ckpt").write_bytes(b"\x80\x02}q.")
    return tmp / "m.ckpt"


@case("text-file", "file")
def _(tmp, base):
    (tmp / "m.safetensors").write_text(f"{SECRET}\npassword: hunter2\n")  # its first bytes were quoted
    return tmp / "m.safetensors"


@case("folder-named-safetensors", "file")
def _(tmp, base):
    (tmp / "x.safetensors").mkdir()
    return tmp / "x.safetensors"


@case("fifo", "file")
def _(tmp, base):
    os.mkfifo(tmp / "m.safetensors")
    return tmp / "m.safetensors"


@case("link-to-dev-zero", "file")
def _(tmp, base):
    (tmp / "m.safetensors").symlink_to("/dev/zero")
    return tmp / "m.safetensors"


@case("socket", "file")
def _(tmp, base):
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # a socket's path must be short (108 bytes)
    SHORT_LIVED.append(folder)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "m.safetensors"))  # the socket file stays after closing
    return folder / "m.safetensors"


@case("symlink-loop", "file")
def _(tmp, base):
    (tmp / "m.safetensors").symlink_to(tmp / "m.safetensors")
    return tmp / "m.safetensors"


@case("broken-symlink", "file")
def _(tmp, base):
    (tmp / "m.safetensors").symlink_to(tmp / "nowhere.safetensors")
    return tmp / "m.safetensors"


# single files: safetensors headers


@case("st-header-longer-than-file", "file")
def _(tmp, base):
    path = tmp / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b'{"' + SECRET.encode() + b'": 1}')
    return path


@case("st-header-not-utf8", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", b'{"\xff\xfe' + SECRET.encode() + b'": 1}')


@case("st-header-not-json", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", b"{" + SECRET.encode())


@case("st-header-nested-too-deep", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@case("st-header-a-list", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", b"[1, 2]")


@case("st-entry-not-an-object", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": SECRET})


@case("st-offsets-strings", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4], "0", "16")}, bytes(16))


@case("st-offsets-null", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4], None, None)}, bytes(16))


@case("st-offsets-negative", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4], -16, 0)}, bytes(16))


@case("st-offsets-one-number", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16]}}, bytes(16))


@case("st-offsets-overlap", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, bytes(24))


@case("st-offsets-gap", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"a": f32([4], 16, 32)}, bytes(32))


@case("st-offsets-past-the-file", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([400], 0, 1600)}, bytes(16))


@case("st-trailing-bytes", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4], 0, 16)}, bytes(16) + SECRET.encode())


@case("st-unknown-dtype", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": {"dtype": SECRET, "shape": [4], "data_offsets": [0, 16]}}, bytes(16))


@case("st-negative-dim", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([-4, -1], 0, 16)}, bytes(16))


@case("st-fractional-dim", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4.0], 0, 16)}, bytes(16))


@case("st-boolean-dim", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([True, 4], 0, 16)}, bytes(16))


@case("st-shape-not-a-list", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32(SECRET, 0, 16)}, bytes(16))


@case("st-size-does-not-match-offsets", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"w": f32([4, 4], 0, 16)}, bytes(16))


@case("st-metadata-a-list", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"__metadata__": [SECRET], "w": f32([4], 0, 16)}, bytes(16))


@case("st-metadata-not-strings", "file")
def _(tmp, base):
    return write_st(tmp / "m.safetensors", {"__metadata__": {"a": {"b": SECRET}}, "w": f32([4], 0, 16)}, bytes(16))


@case("st-truncated-in-the-data", "file")
def _(tmp, base):
    data = base.single.read_bytes()
    (tmp / "m.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "m.safetensors"


# single files: torch zips and legacy pickles


def _torch_zip(tmp: Path, obj, name="m.ckpt") -> Path:
    torch.save(obj, tmp / name)
    return tmp / name


@case("zip-truncated", "file")
def _(tmp, base):
    path = _torch_zip(tmp, {"state_dict": {"w": torch.ones(64)}})
    path.write_bytes(path.read_bytes()[:300])
    return path


@case("zip-garbage-pickle", "file")
def _(tmp, base):
    path = tmp / "m.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + SECRET.encode())
        z.writestr("archive/version", b"3\n")
    return path


@case("zip-bomb", "file")
def _(tmp, base):
    """A data.pkl of 64 MiB of zeros deflated to ~64 KB: torch would inflate it all before failing."""
    path = tmp / "m.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("archive/data.pkl", "w") as member:
            for _ in range(64):
                member.write(bytes(MiB))
        z.writestr("archive/version", b"3\n")
    return path


@case("zip-holds-a-list", "file")
def _(tmp, base):
    return _torch_zip(tmp, [torch.ones(2), SECRET])


@case("zip-sparse-tensor", "file")
def _(tmp, base):
    return _torch_zip(tmp, {"w": torch.eye(3).to_sparse()})


def _legacy_with_storage_size(tmp: Path, encoded_size: bytes) -> Path:
    """A legacy torch pickle whose storage declares another size (the pickle's BININT1 4 replaced)."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    at = data.index(b"cpuq")
    at = data.index(b"K\x04", at)
    (tmp / "m.pt").write_bytes(data[:at] + encoded_size + data[at + 2:])
    return tmp / "m.pt"


@case("legacy-huge-storage", "file")
def _(tmp, base):
    return _legacy_with_storage_size(tmp, b"\x8a\x06" + (2**40).to_bytes(6, "little"))


@case("legacy-negative-storage", "file")
def _(tmp, base):
    return _legacy_with_storage_size(tmp, b"J" + struct.pack("<i", -5))


@case("legacy-storage-size-none", "file")
def _(tmp, base):
    return _legacy_with_storage_size(tmp, b"N")


@case("legacy-truncated", "file")
def _(tmp, base):
    path = tmp / "m.pt"
    torch.save({"w": torch.ones(64)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    return path


# single files: readable tensors, wrong model


def _tiny_variant(tmp: Path, base: Base, change) -> Path:
    raw = read_checkpoint(base.single)
    tensors, metadata = dict(raw.tensors), dict(raw.metadata)
    change(tensors, metadata)
    return write_safetensors(tmp / "m.safetensors", tensors, metadata)


@case("tensor-wrong-shape", "model")
def _(tmp, base):
    def change(t, m):
        t["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 1)
    return _tiny_variant(tmp, base, change)


@case("tensor-missing", "model")
def _(tmp, base):
    return _tiny_variant(tmp, base, lambda t, m: t.pop("model.diffusion_model.out.2.bias"))


@case("tensor-unexpected", "model")
def _(tmp, base):
    return _tiny_variant(tmp, base, lambda t, m: t.update({f"first_stage_model.{SECRET}": torch.zeros(1)}))


@case("tensor-integer-weights", "model")
def _(tmp, base):
    def change(t, m):
        key = "model.diffusion_model.out.2.weight"
        t[key] = torch.zeros(t[key].shape, dtype=torch.int32)
    return _tiny_variant(tmp, base, change)


@case("stored-config-not-json", "model")
def _(tmp, base):
    return _tiny_variant(tmp, base, lambda t, m: m.update({"sdlab.config": "{" + SECRET}))


@case("stored-config-huge-layers", "model")
def _(tmp, base):
    def change(t, m):
        config = json.loads(m["sdlab.config"])
        config["unet"]["layers_per_block"] = 10**9
        config["unet"]["context_dim"] = SECRET
        m["sdlab.config"] = json.dumps(config)
    return _tiny_variant(tmp, base, change)


def _detected_variant(tmp: Path, base: Base, change, metadata=None) -> Path:
    tensors = dict(base.ldm)
    change(tensors)
    return write_safetensors(tmp / "m.safetensors", tensors, metadata)


@case("detect-1d-conv-in", "model")
def _(tmp, base):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    return _detected_variant(tmp, base, lambda t: t.update({key: torch.zeros(32)}))


@case("detect-0d-token-embedding", "model")
def _(tmp, base):
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    return _detected_variant(tmp, base, lambda t: t.update({key: torch.zeros(())}))


@case("detect-no-vae-down-blocks", "model")
def _(tmp, base):
    def change(t):
        for key in [k for k in t if k.startswith("first_stage_model.encoder.down.")]:
            del t[key]
    return _detected_variant(tmp, base, change)


@case("detect-non-numeric-block", "model")
def _(tmp, base):
    key = "model.diffusion_model.input_blocks.x.0.weight"
    return _detected_variant(tmp, base, lambda t: t.update({key: torch.zeros(1)}))


@case("detect-huge-block-number", "model")
def _(tmp, base):
    key = "model.diffusion_model.input_blocks." + "9" * 5000 + ".0.weight"
    return _detected_variant(tmp, base, lambda t: t.update({key: torch.zeros(1)}))


@case("detect-zero-channels", "model")
def _(tmp, base):
    return _detected_variant(
        tmp, base, lambda t: t.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(0, 4, 3, 3)}))


@case("detect-key-of-many-dots", "model")
def _(tmp, base):
    key = "model.diffusion_model." + "a." * 100_000 + "weight"
    return _detected_variant(tmp, base, lambda t: t.update({key: torch.zeros(1)}))


@case("detect-prediction-type-unknown", "model")
def _(tmp, base):
    return _detected_variant(tmp, base, lambda t: None, metadata={"prediction_type": SECRET})


# diffusers folders


def _folder(tmp: Path, base: Base) -> Path:
    """A copy of the tiny folder whose files are symlinks to the original (cheap); edits replace a link."""
    return Path(shutil.copytree(base.folder, tmp / "model", copy_function=os.symlink))


def _replace(path: Path, data: bytes | None = None) -> Path:
    path.unlink()
    if data is not None:
        path.write_bytes(data)
    return path


def _edit_json(folder: Path, file: str, changes: dict) -> Path:
    path = folder / file
    data = json.loads(path.read_text())
    data.update(changes)
    _replace(path, json.dumps(data).encode())
    return folder


JSON_EDITS = {
    "unet-layers-per-block-huge": ("unet/config.json", {"layers_per_block": 1_000_000_000}),
    "unet-layers-per-block-string": ("unet/config.json", {"layers_per_block": SECRET}),
    "unet-layers-per-block-list": ("unet/config.json", {"layers_per_block": [1, 2]}),
    "unet-layers-per-block-zero": ("unet/config.json", {"layers_per_block": 0}),
    "unet-layers-per-block-bool": ("unet/config.json", {"layers_per_block": True}),
    "unet-channels-string": ("unet/config.json", {"block_out_channels": [32, SECRET]}),
    "unet-channels-an-int": ("unet/config.json", {"block_out_channels": 64}),
    "unet-channels-negative": ("unet/config.json", {"block_out_channels": [-32, 64]}),
    "unet-channels-not-groups": ("unet/config.json", {"block_out_channels": [36, 64]}),
    "unet-channels-huge": ("unet/config.json", {"block_out_channels": [32, 2**40]}),
    "unet-too-many-levels": ("unet/config.json", {
        "block_out_channels": [32] * 9, "down_block_types": ["DownBlock2D"] * 9, "up_block_types": ["UpBlock2D"] * 9}),
    "unet-cross-attention-negative": ("unet/config.json", {"cross_attention_dim": -1}),
    "unet-cross-attention-per-level": ("unet/config.json", {"cross_attention_dim": [32, 64]}),
    "unet-cross-attention-huge": ("unet/config.json", {"cross_attention_dim": 10**9}),
    "unet-heads-string": ("unet/config.json", {"attention_head_dim": SECRET}),
    "unet-heads-zero": ("unet/config.json", {"attention_head_dim": 0}),
    "unet-heads-do-not-divide": ("unet/config.json", {"attention_head_dim": 5}),
    "unet-norm-groups-zero": ("unet/config.json", {"norm_num_groups": 0}),
    "unet-in-channels-fraction": ("unet/config.json", {"in_channels": 4.5}),
    "unet-depth-huge": ("unet/config.json", {"transformer_layers_per_block": 10**9}),
    "unet-sample-size-string": ("unet/config.json", {"sample_size": SECRET}),
    "unet-linear-projection-string": ("unet/config.json", {"use_linear_projection": SECRET}),
    "unet-norm-eps-string": ("unet/config.json", {"norm_eps": SECRET}),
    "unet-down-block-unknown": ("unet/config.json", {"down_block_types": [SECRET, "DownBlock2D"]}),
    "unet-down-blocks-a-string": ("unet/config.json", {"down_block_types": SECRET}),
    "unet-act-fn-unknown": ("unet/config.json", {"act_fn": SECRET}),
    "vae-latent-channels-zero": ("vae/config.json", {"latent_channels": 0}),
    "vae-layers-huge": ("vae/config.json", {"layers_per_block": 10**9}),
    "vae-channels-empty": ("vae/config.json", {"block_out_channels": []}),
    "vae-scaling-string": ("vae/config.json", {"scaling_factor": SECRET}),
    "vae-scaling-negative": ("vae/config.json", {"scaling_factor": -1}),
    "text-width-zero": ("text_encoder/config.json", {"hidden_size": 0}),
    "text-layers-huge": ("text_encoder/config.json", {"num_hidden_layers": 10**9}),
    "text-vocab-string": ("text_encoder/config.json", {"vocab_size": SECRET}),
    "text-heads-do-not-divide": ("text_encoder/config.json", {"num_attention_heads": 3}),
    "text-architectures-a-string": ("text_encoder/config.json", {"architectures": SECRET}),
    "text-hidden-act-a-list": ("text_encoder/config.json", {"hidden_act": [SECRET]}),
    "text-model-type-unknown": ("text_encoder/config.json", {"model_type": SECRET}),
    "scheduler-timesteps-string": ("scheduler/scheduler_config.json", {"num_train_timesteps": SECRET}),
    "scheduler-beta-negative": ("scheduler/scheduler_config.json", {"beta_start": -1}),
    "scheduler-offset-huge": ("scheduler/scheduler_config.json", {"steps_offset": 10**9}),
    "scheduler-prediction-unknown": ("scheduler/scheduler_config.json", {"prediction_type": SECRET}),
    "index-guidance-string": ("model_index.json", {"_sdlab_default_guidance": SECRET}),
    "index-unet-entry-unknown": ("model_index.json", {"unet": ["diffusers", SECRET]}),
    "tokenizer-pad-a-list": ("tokenizer/special_tokens_map.json", {"pad_token": [SECRET]}),
    "tokenizer-pad-unknown": ("tokenizer/special_tokens_map.json", {"pad_token": SECRET}),
}
for _name, (_file, _changes) in JSON_EDITS.items():
    case(_name, "folder")(lambda tmp, base, file=_file, changes=_changes: _edit_json(_folder(tmp, base), file, changes))


@case("index-not-json", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "model_index.json", b"{" + SECRET.encode())
    return folder


@case("index-not-an-object", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "model_index.json", json.dumps([SECRET]).encode())
    return folder


@case("index-not-utf8", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "model_index.json", b'{"\xff\xfe' + SECRET.encode() + b'": 1}')
    return folder


@case("index-a-folder", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "model_index.json").mkdir()
    return folder


@case("index-a-fifo", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    os.mkfifo(_replace(folder / "model_index.json"))
    return folder


@case("index-symlink-loop", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "model_index.json").symlink_to(folder / "model_index.json")
    return folder


@case("unet-config-a-fifo", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    os.mkfifo(_replace(folder / "unet" / "config.json"))
    return folder


@case("unet-config-missing", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "unet" / "config.json")
    return folder


@case("unet-folder-missing", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    config = (folder / "unet" / "config.json").read_bytes()
    shutil.rmtree(folder / "unet")
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_bytes(config)  # configs read, but no weights
    shutil.rmtree(folder / "vae")
    return folder


@case("unet-folder-a-symlink-loop", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    shutil.rmtree(folder / "unet")
    (folder / "unet").symlink_to(folder / "unet")
    return folder


@case("unet-weights-a-fifo", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    os.mkfifo(_replace(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return folder


@case("unet-weights-symlink-loop", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    path = _replace(folder / "unet" / "diffusion_pytorch_model.safetensors")
    path.symlink_to(path)
    return folder


@case("unet-weights-truncated", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    _replace(path, data[: len(data) - 100])
    return folder


@case("unet-weights-wrong-shape", "model")
def _(tmp, base):
    folder = _folder(tmp, base)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = dict(read_checkpoint(path).tensors)
    tensors["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    _replace(path)
    write_safetensors(path, tensors)
    return folder


@case("unet-shard-index-bad-names", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    _replace(folder / "unet" / "diffusion_pytorch_model.safetensors")
    index = {"weight_map": {"conv_in.weight": 5, "conv_out.weight": f"../{SECRET}"}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@case("tokenizer-merges-a-fifo", "folder")
def _(tmp, base):
    folder = _folder(tmp, base)
    os.mkfifo(_replace(folder / "tokenizer" / "merges.txt"))
    return folder


# --- the checks -----------------------------------------------------------------------------------------


def assert_clear(message: str, path: Path) -> None:
    assert "\n" not in message.strip(), message
    assert str(path) in message, message
    assert "SECRET" not in message and "hunter2" not in message, message  # not even part of it
    assert "Traceback" not in message


@pytest.fixture
def bad(request, tmp_path, base):
    builder, kind = CASES[request.param]
    yield builder(tmp_path, base), kind
    while SHORT_LIVED:
        shutil.rmtree(SHORT_LIVED.pop(), ignore_errors=True)


@pytest.mark.parametrize("bad", sorted(CASES), indirect=True)
def test_load_refuses_with_one_clear_error(bad):
    path, _ = bad
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(CheckpointError) as error:
        sdlab.load(path)
    assert type(error.value) is CheckpointError
    assert_clear(str(error.value), path)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 48 * MiB, f"refusing {path.name} raised the peak RSS by {grown / MiB:.0f} MiB"


@pytest.mark.parametrize("bad", sorted(n for n, (_, kind) in CASES.items() if kind == "file"), indirect=True)
def test_read_checkpoint_refuses_a_broken_file(bad):
    path, _ = bad
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert type(error.value) is CheckpointError
    assert_clear(str(error.value), path)


@pytest.mark.parametrize("bad", sorted(CASES), indirect=True)
def test_info_exits_non_zero_with_the_error(bad, capsys):
    path, _ = bad
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("sdlab info: error:")]
    assert len(errors) == 1 and captured.out == "", captured
    assert_clear(errors[0], path)


def test_the_valid_bases_load(base, tmp_path, capsys):
    """The corpus is made by damaging these, so each must load (and `info` must accept it) as it is."""
    single = write_safetensors(tmp_path / "small.safetensors", base.ldm)
    for path in (base.single, base.folder, single):
        sdlab.load(path)
        assert main(["info", str(path), "--no-hash"]) == 0
    assert sdlab.load(single).config.unet == SMALL_SD1.unet  # detected from shapes alone
    capsys.readouterr()


def test_a_deflate_bomb_is_refused_before_inflating(tmp_path, base, monkeypatch):
    """Refused from the zip directory alone: torch.load, which would inflate the 64 MiB member, never runs."""
    path = CASES["zip-bomb"][0](tmp_path, base)
    assert path.stat().st_size < MiB

    def torch_load(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr("sdlab.checkpoints.io.torch.load", torch_load)
    with pytest.raises(CheckpointError, match="zip bomb"):
        read_checkpoint(path)


def test_a_stored_zip_of_real_weights_still_loads(tmp_path):
    path = _torch_zip(tmp_path, {"state_dict": {"w": torch.zeros(256, 256)}})  # compresses ~1000x if deflated
    assert torch.equal(read_checkpoint(path).tensors["w"], torch.zeros(256, 256))


def test_a_deflated_zip_is_read_without_mmap(tmp_path):
    """torch's mmap path would hand out a compressed member's raw bytes; a deflated zip is read normally."""
    stored = _torch_zip(tmp_path, {"w": torch.arange(64.0)}, "stored.pt")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member))
    assert torch.equal(read_checkpoint(deflated).tensors["w"], torch.arange(64.0))


# --- malicious pickles: refused, and the payload never runs ----------------------------------------------


class Payload:
    """Unpickling this runs `kind` with arguments that create `marker` (a stand-in for arbitrary code)."""

    def __init__(self, kind: str, marker: Path):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        code = f"open({self.marker!r}, 'w').close()"
        return {
            "os.system": (os.system, (f"touch '{self.marker}'",)),
            "builtins.exec": (builtins.exec, (code,)),
            "builtins.eval": (builtins.eval, (code,)),
            "subprocess.check_call": (subprocess.check_call, (["touch", self.marker],)),
            "builtins.open": (builtins.open, (self.marker, "w")),
        }[self.kind]


PAYLOADS = ("os.system", "builtins.exec", "builtins.eval", "subprocess.check_call", "builtins.open")
EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def _malicious(tmp: Path, kind: str, form: str, extension: str) -> tuple[Path, Path]:
    marker, path = tmp / "pwned", tmp / f"evil{extension}"
    payload = Payload(kind, marker)
    if form == "zip":  # a torch.save archive whose data.pkl holds the payload beside real weights
        torch.save({"state_dict": {"w": torch.ones(2)}, "callback": payload}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol={"pickle-2": 2, "pickle-4": 4, "pickle-0": 0}[form]))
    return path, marker


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_are_real(tmp_path, kind):
    """Each payload does create its marker when unpickled unsafely, so its absence below means something."""
    path, marker = _malicious(tmp_path, kind, "pickle-2", ".ckpt")
    result = pickle.loads(path.read_bytes())
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("extension", EXTENSIONS)
@pytest.mark.parametrize("form", ["zip", "pickle-2", "pickle-4", "pickle-0"])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_pickles_are_refused_and_never_run(tmp_path, kind, form, extension, capsys):
    path, marker = _malicious(tmp_path, kind, form, extension)
    assert not marker.exists()  # making the file did not run it
    for attempt in (read_checkpoint, sdlab.load):
        with pytest.raises(CheckpointError) as error:
            attempt(path)
        assert_clear(str(error.value), path)
        assert "unsafe" in str(error.value) or "unrecognised header" in str(error.value)
    assert main(["info", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["tensor-wrong-shape", "unet-weights-wrong-shape", "tensor-unexpected"], indirect=True)
def test_convert_refuses_weights_that_would_not_load_and_writes_nothing(bad, tmp_path, capsys):
    path, _ = bad
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 2
    assert not out.exists()
    assert_clear(capsys.readouterr().err.strip(), path)


@pytest.mark.parametrize("name", ["a\x00b.safetensors", "x" * 5000 + ".safetensors"], ids=["nul", "too-long"])
def test_impossible_paths(tmp_path, name):
    with pytest.raises(CheckpointError, match="not a valid path|cannot be read"):
        sdlab.load(tmp_path / name)
