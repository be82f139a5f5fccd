"""Two processes (torchrun, gloo on CPU, DistributedDataParallel) train what one process trains with the
same global batch, and every rank ends with the same weights."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from sdlab.train.state import CheckpointManager

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from sdlab.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
    trainer.run()
    weights = {n: p.detach().clone() for n, p in trainer.params.items()}
    torch.save(weights, os.path.join(trainer.config.output_dir, f"rank{trainer.dist.rank}.pt"))
    trainer.close()
""")


def config(tmp_path, name, batch_size):
    # adam_eps well above the rounding noise of gradients: Adam divides by sqrt(v) + eps, which for elements
    # with near-zero gradients turns 1e-9 summation-order differences into full-size updates of either sign.
    return dict(adam_eps=1e-4, model="tiny", data="shapes", shapes_length=16, resolution=32, steps=3, batch_size=batch_size,
                grad_accum=2, lr=1e-3, caption_dropout=0.3, ema_decay=0.5, log_every=1, save_every=0,
                output_dir=str(tmp_path / name), progress_bar=False, export_layouts=[])


def launch(tmp_path, values, processes):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(script), json.dumps(values)]
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    launch(tmp_path, config(tmp_path, "two", batch_size=2), processes=2)
    launch(tmp_path, config(tmp_path, "one", batch_size=4), processes=1)
    rank0 = torch.load(tmp_path / "two" / "rank0.pt")
    rank1 = torch.load(tmp_path / "two" / "rank1.pt")
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert rank0.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the replicas identical
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    # the weights moved: the comparison is not between two untouched initialisations
    first = CheckpointManager.load(tmp_path / "one" / "checkpoints" / "step-00000003.pt")
    assert first["data"] == CheckpointManager.load(tmp_path / "two" / "checkpoints" / "step-00000003.pt")["data"]
    log_two = [json.loads(l) for l in (tmp_path / "two" / "loss.jsonl").read_text().splitlines()]
    log_one = [json.loads(l) for l in (tmp_path / "one" / "loss.jsonl").read_text().splitlines()]
    for a, b in zip(log_two, log_one):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(b["loss"]))
    assert not (tmp_path / "two" / "rank2.pt").exists()
