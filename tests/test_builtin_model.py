"""The built-in model shipped in sdlab/data/builtin/: its folder, its numerics against diffusers, its quality.

The model is the small latent diffusion model trained on the shapes world by scripts/train_builtin.py.
diffusers' StableDiffusionPipeline must load the same folder and give the same image for the same seed, and
on a few easy prompts the shapes evaluator must find what was asked for.
"""

import json

import diffusers
import numpy as np
import pytest
import torch

import sdlab
from sdlab import rng
from sdlab.generation import sample_batch
from sdlab.model import Model, builtin_model_path
from sdlab.params import GenerationParams
from sdlab.shapes import evaluate

PROMPT = "a red circle above a blue square"
MAX_BYTES = 30 * 10**6


@pytest.fixture(scope="module")
def folder():
    return builtin_model_path()


@pytest.fixture(scope="module")
def model(folder):
    torch.set_num_threads(1)
    return Model.from_name(None)


def test_folder_is_diffusers_layout_in_fp16_and_small(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    weights = sorted(folder.glob("*/*.safetensors"))
    assert [w.parent.name for w in weights] == ["text_encoder", "unet", "vae"]
    for path in weights:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes == {"F16"}, f"{path} holds {dtypes}"
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"the built-in model takes {total / 1e6:.1f} MB"


def test_loaded_when_no_model_is_named(model, folder):
    assert model.source == folder
    assert model.config.default_size == 64
    assert model.dtype == torch.float32  # fp16 files are computed in fp32 on a CPU
    assert model.tokenizer("a red circle").shape[-1] == model.config.text_encoder.max_length


# sdlab's default for this zero-terminal-SNR model (its own trailing timesteps), and Karras sigmas.
SCHEDULES = {"automatic": dict(), "karras": dict(timestep_spacing="leading", use_karras_sigmas=True)}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_same_image_as_diffusers(folder, model, schedule):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **SCHEDULES[schedule])
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=20, guidance_scale=5.0, height=64, width=64)
    theirs = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **call).images
    ours = sdlab.StableDiffusionPipeline(model, sampler="DPM++ 2M", schedule=schedule)(
        PROMPT, generator=torch.Generator().manual_seed(7), **call).images
    a = np.asarray(ours[0], dtype=np.int16)
    b = (theirs[0] * 255).round().astype(np.int16)
    assert b.std() > 10, "the reference image is flat: the comparison would prove nothing"
    assert np.abs(a - b).max() <= 2


EASY_PROMPTS = [
    "a red circle", "a blue square", "a green circle", "a yellow square",
    "a black star", "a white triangle on a black background", "an orange cross", "a purple diamond",
]


def test_draws_what_easy_prompts_ask_for(model):
    params = GenerationParams(steps=20, batch_size=len(EASY_PROMPTS)).resolved(model.config)
    assert params.cfg_scale == 2.0  # the model's own default guidance, from its model_index.json
    seeds = list(range(100, 100 + len(EASY_PROMPTS)))
    images = sample_batch(model, EASY_PROMPTS, [""] * len(EASY_PROMPTS), params, rng.generators(seeds)).images
    table = evaluate(EASY_PROMPTS, images)
    # Floors for the shipped model: one clean shape per image, and both the asked-for colour and shape.
    # Version 3 gives 8/8 right and 6/8 one shape (its failures here draw the shape twice), version 2 gave
    # 8/8 and 7/8 (at CFG 5), random weights 0/8.
    right = sum(s["colour"] and s["shape"] for s in table.scores)
    one_shape = sum(s["count"] for s in table.scores)
    assert one_shape >= 6, f"one shape drawn in only {one_shape}/8 images:\n{table.to_text()}"
    assert right >= 6, f"colour and shape right on only {right}/8:\n{table.to_text()}"


def test_the_recipe_stages_are_valid_training_configs(tmp_path):
    """scripts/train_builtin.py's stages: each recipe JSON is a valid TrainConfig, each stage starts where the
    previous one ended, and each one after the unet stage sees data its predecessors never did."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "train_builtin.py"
    spec = importlib.util.spec_from_file_location("train_builtin", script)
    train_builtin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_builtin)
    assert train_builtin.STAGES == ("vae", "unet", "refine", "polish")
    vae, unet, refine, polish = (train_builtin.stage_config(name, tmp_path) for name in train_builtin.STAGES)
    assert (vae.task, unet.task, refine.task, polish.task) == ("vae", "diffusion", "diffusion", "diffusion")
    assert unet.vae_from == str(tmp_path / "vae" / "model")
    assert refine.init_from == str(tmp_path / "unet" / "model")  # the UNet stage's exported EMA weights
    assert polish.init_from == str(tmp_path / "refine" / "model")
    assert len({unet.seed, refine.seed, polish.seed}) == 3  # each stage draws its own 100,000 scenes
    assert unet.shapes_mix == sdlab.shapes.ShapesMix()  # the world's own mix; the later stages lean to two shapes
    for later in (refine, polish):
        assert later.shapes_mix.object_probabilities[1] > unet.shapes_mix.object_probabilities[1]
        assert later.shapes_mix.relation_share > unet.shapes_mix.relation_share
    assert train_builtin.stage_config("polish", tmp_path, init_from="elsewhere").init_from == "elsewhere"
