"""`sdlab generate --prompts` under torchrun: prompts split over 2 CPU processes, none lost or duplicated,
seeds (and so images) independent of the number of processes."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sdlab.pngmeta import parse_infotext, read_infotext

PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow triangle", "a purple circle"]
FLAGS = ["--model", "random:tiny", "--steps", "1", "--size", "32x32", "--seed", "50", "-q"]


def made(folder) -> dict[tuple[str, int], np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.png")):
        info = parse_infotext(read_infotext(path))
        key = (info.prompt, int(info.fields["Seed"]))
        assert key not in out, f"duplicate image for {key}"
        out[key] = np.asarray(Image.open(path).convert("RGB"))
    return out


def test_two_processes_split_prompts_deterministically(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sdlab.cli", "generate", "--prompts", str(tmp_path / "prompts.txt"), *FLAGS,
               "--out", str(tmp_path / "two")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    two = made(tmp_path / "two")
    assert sorted(two) == sorted((p, 50 + k) for k, p in enumerate(PROMPTS))  # all there, once each

    single = [sys.executable, "-m", "sdlab.cli", "generate", "--prompts", str(tmp_path / "prompts.txt"),
              *FLAGS, "--out", str(tmp_path / "one")]
    run = subprocess.run(single, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    one = made(tmp_path / "one")
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(one[key], two[key]), key
