"""The diffusers-style front door: model ids from the local Hugging Face cache, defaults, errors."""

import numpy as np
import pytest
import torch

import sdlab
from sdlab.config import TINY
from sdlab.errors import CheckpointError
from sdlab.pipeline import StableDiffusionPipeline, resolve_model_path


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding the tiny model as 'sdlab-test/tiny'."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--sdlab-test--tiny"
    torch.manual_seed(0)
    sdlab.Model.build(TINY).save(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return cache


def test_model_id_resolves_from_local_hub_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("sdlab-test/tiny") == hub_cache / "models--sdlab-test--tiny" / "snapshots" / "0123abcd"
    pipe = StableDiffusionPipeline.from_pretrained("sdlab-test/tiny", torch_dtype=torch.float32)
    assert pipe.sampler == "PLMS"  # the folder's scheduler is PNDM, as SD 1.5 ships
    images = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (64, 64)


def test_unknown_id_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="huggingface-cli download someone/missing"):
        StableDiffusionPipeline.from_pretrained("someone/missing")


def test_pipeline_batches_prompts_like_diffusers(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    pipe = StableDiffusionPipeline.from_pretrained("sdlab-test/tiny")
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, num_inference_steps=2,
               generator=torch.Generator().manual_seed(1)).images
    assert len(out) == 4
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))
