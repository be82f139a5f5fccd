"""`sdlab train` flags follow TrainConfig; JSON configs (run and architecture); `python -m sdlab.train` runs."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from sdlab.config import TINY
from sdlab.errors import ParameterError
from sdlab.train import TrainConfig, model_config_to_json, resolve_model_config
from sdlab.train.cli import add_arguments, config_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_field_has_a_flag_and_values_convert():
    args = parse("--model", "tiny", "--steps", "3", "--no-center-crop", "--sample-prompts", "a cat", "a dog",
                 "--lora-alpha", "none", "--adam-betas", "0.8", "0.9", "--precision", "bf16", "--lr", "3e-4")
    config = config_from_args(args)
    assert config.steps == 3 and config.center_crop is False and config.lr == 3e-4
    assert config.sample_prompts == ("a cat", "a dog") and config.adam_betas == (0.8, 0.9)
    assert config.lora_alpha is None and config.precision == "bf16"
    assert config_from_args(parse()) == TrainConfig()  # no flags: the defaults
    with pytest.raises(SystemExit):
        parse("--precision", "fp8")


def test_json_config_with_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 50, "batch_size": 4, "sample_prompts": ["x"]}))
    config = config_from_args(parse("--config", str(path), "--steps", "60"))
    assert (config.steps, config.batch_size, config.sample_prompts) == (60, 4, ("x",))
    path.write_text(json.dumps({"stepz": 5}))
    with pytest.raises(ParameterError, match="stepz"):
        config_from_args(parse("--config", str(path)))


def test_validation_messages_name_the_field():
    with pytest.raises(ParameterError, match="caption_dropout=1.5"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ParameterError, match="cache_latents"):
        TrainConfig(cache_latents=True, center_crop=False)
    with pytest.raises(ParameterError, match="buckets"):
        TrainConfig(buckets=True, data="shapes")
    with pytest.raises(ParameterError, match="shapes_relation_share.*relation_share=-0.1"):
        TrainConfig(shapes_relation_share=-0.1)


def test_shapes_mix_flags():
    config = config_from_args(parse("--shapes-object-weights", "1", "2", "1", "--shapes-relation-share", "0.9"))
    assert config.shapes_mix.object_probabilities == (0.25, 0.5, 0.25)
    assert config.shapes_mix.relation_share == 0.9
    with pytest.raises(ParameterError, match="three non-negative numbers"):
        config_from_args(parse("--shapes-object-weights", "1", "2"))


def test_model_architecture_from_a_json_file(tmp_path):
    small = TINY.replace(name="shapes-small", default_size=64)
    path = model_config_to_json(small, tmp_path / "arch.json")
    assert resolve_model_config(str(path)) == small
    assert resolve_model_config("tiny") == TINY
    data = json.loads(path.read_text())
    data["unet"]["chanels"] = [32, 64]
    path.write_text(json.dumps(data))
    with pytest.raises(ParameterError, match="chanels"):
        resolve_model_config(str(path))
    with pytest.raises(ParameterError, match="neither a preset"):
        resolve_model_config("no-such-model")


def run_module(*argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdlab.train", *argv], capture_output=True, text=True, env=env, check=False,
                          cwd=cwd, timeout=120)


def test_python_dash_m_runs_and_reports_errors(tmp_path):
    shown = run_module("--print-config", "--steps", "7", cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["steps"] == 7
    done = run_module("--model", "tiny", "--resolution", "32", "--steps", "2", "--batch-size", "2",
                      "--shapes-length", "4", "--output-dir", "out", "--export-layouts", "single-file",
                      "--no-progress-bar", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "step-00000002.pt").is_file()
    assert len((tmp_path / "out" / "loss.jsonl").read_text().splitlines()) == 1  # log_every=10: the last step
    bad = run_module("--model", "tiny", "--resolution", "30", "--steps", "1", "--output-dir", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and "resolution=30 must be a multiple of 4" in bad.stderr
