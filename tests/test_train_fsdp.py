"""`sharding="fsdp"`: two processes (torchrun, gloo on CPU, FSDP2 `fully_shard`) fine-tuning a tiny SDXL (UNet and
both text encoders) train what one process trains with the same global batch; checkpoints are whole state dicts
of the same format as one process writes (either resumes from the other's); an interrupted FSDP run resumed
ends bit for bit where the uninterrupted one does; the export holds the gathered (EMA) weights.
(tests/test_train_resume.py kills real processes; here a fresh Trainer resumes in the same processes.)"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import sdlab
from sdlab.errors import ParameterError
from sdlab.train import TrainConfig, Trainer
from sdlab.train.state import CheckpointManager

# One launch runs several jobs in the same two processes (each a fresh Trainer): starting processes is what
# costs time here. {"config": ...} trains; {"copy": [checkpoint, folder]} puts one checkpoint (and the loss
# log) into a fresh run folder, as a run killed after that checkpoint leaves it; {"check_resume": ...} only
# resumes and saves what the ranks then hold, gathered.
SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from sdlab.train import TrainConfig, Trainer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from sdlab.train import sharding

    trainer = None
    for job in json.loads(sys.argv[1]):
        if "copy" in job:
            source, folder = job["copy"]
            if int(os.environ["RANK"]) == 0:
                os.makedirs(os.path.join(folder, "checkpoints"))
                shutil.copy(source, os.path.join(folder, "checkpoints"))
                shutil.copy(os.path.join(os.path.dirname(os.path.dirname(source)), "loss.jsonl"), folder)
            dist.barrier()
            continue
        config = TrainConfig(**job["config"])
        trainer = Trainer(config)
        if job.get("check_resume"):
            gathered = {name: sharding.gather_model(m) for name, m in trainer.task.trained.items()}
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            torchs = {name: get_model_state_dict(m, options=options) for name, m in trainer.task.trained.items()}
            if trainer.dist.is_main:
                torch.save({"step": trainer.step, "trained": gathered, "torch": torchs},
                           os.path.join(config.output_dir, "loaded.pt"))
            continue
        trainer.run()
    trainer.close()
""")

NETWORKS = {"unet", "text_encoder", "text_encoder_2"}


def settings(tmp_path, name, **changes):
    # adam_eps well above the rounding noise of gradients (see tests/test_train_distributed.py).
    values = dict(model="tiny-sdxl", data="shapes", shapes_length=16, resolution=32, steps=3, batch_size=1,
                  grad_accum=2, lr=1e-3, adam_eps=1e-4, warmup_steps=1, caption_dropout=0.3, ema_decay=0.5,
                  train_text_encoder=True, sharding="fsdp", save_every=2, keep_last=3, log_every=1,
                  output_dir=str(tmp_path / name), progress_bar=False, export_layouts=[])
    values.update(changes)
    return values


def launch(tmp_path, jobs, processes=2):
    script = tmp_path / "fsdp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(script), json.dumps(jobs)]
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def checkpoint(folder, step):
    return CheckpointManager.load(CheckpointManager(folder / "checkpoints", 1).path(step))


def assert_close(a, b, where, exact=False):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if exact:
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", exact)
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x batch 2 (in this process), then FSDP runs of 2 processes x batch 1: uninterrupted
    (exported); resumed from its step-2 checkpoint alone; and resuming the one-process run's checkpoint."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one = Trainer(TrainConfig(**settings(tmp, "one", batch_size=2, sharding="ddp")))
    one.run()
    shutil.copytree(tmp / "one", tmp / "from_one", ignore=shutil.ignore_patterns("step-00000003.pt"))
    launch(tmp, [
        {"config": settings(tmp, "fsdp", export_layouts=["diffusers"], sample_every=3, sample_steps=2,
                            sample_prompts=["a red circle"])},  # every rank samples: the UNet is sharded
        {"copy": [str(tmp / "fsdp" / "checkpoints" / "step-00000002.pt"), str(tmp / "interrupted")]},
        {"config": settings(tmp, "interrupted")},
        {"config": settings(tmp, "from_one", batch_size=2), "check_resume": True},
    ])
    return tmp, one


def test_two_fsdp_processes_match_one(runs):
    tmp, one = runs
    fsdp, single = checkpoint(tmp / "fsdp", 3), checkpoint(tmp / "one", 3)
    assert set(fsdp["trained"]) == NETWORKS
    for part in ("trained", "ema", "optimizer"):  # whole tensors of the same names, shapes and dtypes
        assert_close(fsdp[part], single[part], part)
    assert fsdp["data"] == single["data"] and fsdp["scheduler"] == single["scheduler"]
    before = checkpoint(tmp / "one", 2)["trained"]["unet"]
    moved = max(float((fsdp["trained"]["unet"][k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4  # step 3 changed the weights: the comparison is not of untouched tensors
    log_fsdp = [json.loads(l) for l in (tmp / "fsdp" / "loss.jsonl").read_text().splitlines()]
    log_one = [json.loads(l) for l in (tmp / "one" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_fsdp] == [1, 2, 3]
    for a, b in zip(log_fsdp, log_one):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(b["loss"]))
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, abs(b["grad_norm"]))


def test_interrupted_fsdp_run_resumes_bit_for_bit(runs):
    """A run stopped after step 2's checkpoint (a fresh Trainer in a folder holding only that) and resumed."""
    tmp, _ = runs
    a, b = checkpoint(tmp / "fsdp", 3), checkpoint(tmp / "interrupted", 3)
    for part in ("trained", "ema", "optimizer", "scheduler", "data", "rng"):
        assert_close(a[part], b[part], part, exact=True)


def test_checkpoints_cross_between_one_process_and_fsdp(runs):
    tmp, _ = runs
    # FSDP resumed a one-process checkpoint: every rank took its shard of the whole weights
    loaded = torch.load(tmp / "from_one" / "loaded.pt")
    assert loaded["step"] == 2
    assert_close(loaded["trained"], checkpoint(tmp / "one", 2)["trained"], "trained", exact=True)
    # sdlab's bucketed gather gives what torch's get_model_state_dict(full_state_dict, cpu_offload) gives
    assert_close(loaded["trained"], loaded["torch"], "gather", exact=True)
    assert [list(s) for s in loaded["trained"].values()] == [list(s) for s in loaded["torch"].values()]
    # one process resumes an FSDP checkpoint (weights, EMA, optimizer by index)
    shutil.copytree(tmp / "fsdp", tmp / "back", ignore=shutil.ignore_patterns("model"))
    (tmp / "back" / "checkpoints" / "step-00000003.pt").unlink()
    saved = checkpoint(tmp / "back", 2)
    trainer = Trainer(TrainConfig(**settings(tmp, "back", sharding="ddp")))
    assert trainer.step == 2
    for name, module in trainer.task.trained.items():
        assert_close(module.state_dict(), saved["trained"][name], name, exact=True)
    assert_close(trainer.optimizer.state_dict(), saved["optimizer"], "optimizer", exact=True)
    assert_close(trainer.ema.state_dict()["shadow"], saved["ema"]["shadow"], "ema", exact=True)


def test_export_holds_the_gathered_ema_weights(runs):
    tmp, _ = runs
    assert (tmp / "fsdp" / "samples" / "step-00000003.png").is_file() and (tmp / "fsdp" / "loss.png").is_file()
    exported = sdlab.load(tmp / "fsdp" / "model")
    ema = checkpoint(tmp / "fsdp", 3)["ema"]["shadow"]
    for name in NETWORKS:
        for key, value in exported.components[name].named_parameters():
            assert torch.equal(value, ema[f"{name}.{key}"]), f"{name}.{key}"


def test_sharding_is_validated():
    with pytest.raises(ParameterError, match="sharding='zero'.*'ddp'.*'fsdp'"):
        TrainConfig(sharding="zero")
    with pytest.raises(ParameterError, match="LoRA trains with sharding='ddp'"):
        TrainConfig(sharding="fsdp", lora_rank=4)
    with pytest.raises(ParameterError, match="task='vae'"):
        TrainConfig(sharding="fsdp", task="vae")
