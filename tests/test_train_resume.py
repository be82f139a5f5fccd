"""Checkpoint/resume: a run killed with SIGKILL (twice) and resumed ends bit for bit where an uninterrupted run
ends; checkpoints are pruned to keep_last; the trained model exports to both layouts."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.errors import ParameterError
from sdlab.model import Model
from sdlab.train import TrainConfig, Trainer
from sdlab.train.state import CheckpointManager

STEPS = 8

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from sdlab.train import TrainConfig, Trainer

    config = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])

    def kill(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flushing: as a crash or an OOM killer

    Trainer(config, callbacks=[kill]).run()
""")


def make_folder(root, n=6, seed=0):
    """n captioned images of assorted sizes (so random crops matter)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (20 + 4 * i, 16 + 2 * (i % 3))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture number {i}")
    return root


def run_config(tmp_path, name, **changes):
    values = dict(
        model="tiny", data=str(make_folder(tmp_path / "images")), resolution=16, center_crop=False,
        random_flip=True, steps=STEPS, batch_size=2, grad_accum=2, save_every=3, keep_last=2, log_every=1,
        lr=1e-3, warmup_steps=2, ema_decay=0.9, caption_dropout=0.5, offset_noise=0.1, min_snr_gamma=5.0,
        output_dir=str(tmp_path / name), progress_bar=False, export_layouts=["diffusers", "single-file"],
    )
    values.update(changes)
    return values


def launch(values, kill_at=-1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(values), str(kill_at)], env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def final_state(folder):
    return CheckpointManager.load(CheckpointManager(folder / "checkpoints", 1).latest())


def assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def losses(folder):
    records = [json.loads(line) for line in (folder / "loss.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    reference = run_config(tmp_path, "reference")
    interrupted = run_config(tmp_path, "interrupted")
    done = launch(reference)
    assert done.returncode == 0, done.stderr[-2000:]

    first = launch(interrupted, kill_at=5)  # the last checkpoint is step 3: steps 4-5 are lost
    assert first.returncode == -signal.SIGKILL
    assert final_state(tmp_path / "interrupted")["step"] == 3
    second = launch(interrupted, kill_at=7)  # resumes at 3, killed after 7, checkpoint 6
    assert second.returncode == -signal.SIGKILL
    assert final_state(tmp_path / "interrupted")["step"] == 6
    third = launch(interrupted)
    assert third.returncode == 0, third.stderr[-2000:]

    a, b = final_state(tmp_path / "reference"), final_state(tmp_path / "interrupted")
    assert a["step"] == b["step"] == STEPS
    for part in ("trained", "ema", "optimizer", "scheduler", "data", "rng"):
        assert_identical(a[part], b[part], part)
    assert a["data"]["epoch"] >= 1  # the data order crossed an epoch boundary (6 images, 4 per step)
    assert losses(tmp_path / "reference") == losses(tmp_path / "interrupted")
    assert [s for s, _, _ in losses(tmp_path / "interrupted")] == list(range(1, STEPS + 1))
    # keep_last=2: only the two newest checkpoints remain, and no temporary files
    names = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").iterdir())
    assert names == ["step-00000006.pt", "step-00000008.pt"]


def test_export_both_layouts_hold_the_ema_weights(tmp_path):
    config = TrainConfig(**run_config(tmp_path, "run", steps=3, save_every=0, export_layouts=("diffusers", "single-file")))
    trainer = Trainer(config)
    result = trainer.run()
    folder, single = tmp_path / "run" / "model", tmp_path / "run" / "model.safetensors"
    assert set(result.exported) == {folder, single}
    ema = trainer.ema.shadow
    for path in (folder, single):
        loaded = Model.load(path)
        assert loaded.config.unet == trainer.model.config.unet
        for name, value in loaded.unet.state_dict().items():
            torch.testing.assert_close(value, ema[f"unet.{name}"], rtol=0, atol=0)
    # the live weights are the trained ones again, not the EMA (a longer run would continue from them)
    live = dict(trainer.model.unet.named_parameters())
    assert not all(torch.equal(live[n], ema[f"unet.{n}"]) for n in live)
    assert (tmp_path / "run" / "loss.png").is_file()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    Trainer(TrainConfig(**run_config(tmp_path, "run", steps=1, export_layouts=()))).run()
    with pytest.raises(ParameterError, match="lr"):
        Trainer(TrainConfig(**run_config(tmp_path, "run", steps=2, lr=5e-4, export_layouts=())))
    # settings that do not change what is computed may change
    trainer = Trainer(TrainConfig(**run_config(tmp_path, "run", steps=2, log_every=2, export_layouts=())))
    assert trainer.step == 1


def test_a_damaged_checkpoint_is_reported_by_name(tmp_path):
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="step-00000001.pt"):
        CheckpointManager.load(path)
