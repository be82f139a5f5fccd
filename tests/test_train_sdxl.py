"""`sdlab train` on SDXL (tiny configs): the size and crop conditions come from the data loader; full fine-tuning
(both text encoders too) resumes bit for bit; two DDP processes train what one does; LoRA files
carry lora_unet_/lora_te1_/lora_te2_ names, merge in sdlab to what training computed, and diffusers'
`StableDiffusionXLPipeline.load_lora_weights` merges them to the same weights."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_resume import assert_identical, final_state

import sdlab
from sdlab.families.sdxl import TINY_SDXL
from sdlab.lora import apply_lora
from sdlab.train import TrainConfig, Trainer
from sdlab.train.data import ImageFolderDataset, collate, make_buckets

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from sdlab.train import TrainConfig, Trainer

    config = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])

    def kill(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(config, callbacks=[kill])
    trainer.run()
    weights = {n: p.detach().clone() for n, p in trainer.params.items()}
    torch.save(weights, os.path.join(config.output_dir, f"rank{trainer.dist.rank}.pt"))
    trainer.close()
""")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SDXL base saved as a diffusers folder (what `init_from` takes)."""
    torch.manual_seed(0)
    return sdlab.Model.build(TINY_SDXL).save(tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 captioned images, half landscape, half portrait, of assorted sizes (two buckets of 4 at 32 px)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        w, h = 40 + 4 * (i % 4), 26 + 2 * (i % 3)
        w, h = (w, h) if i % 2 else (h, w)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture number {i}")
    return root


def settings(base, images, out, **changes):
    values = dict(init_from=str(base), data=str(images), resolution=32, buckets=True, center_crop=False,
                  random_flip=True, steps=4, batch_size=2, grad_accum=2, save_every=2, keep_last=2, log_every=1,
                  lr=1e-3, warmup_steps=1, caption_dropout=0.3, ema_decay=0.5, train_text_encoder=True,
                  output_dir=str(out), progress_bar=False, export_layouts=[])
    values.update(changes)
    return values


def launch(values, kill_at=-1, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-c", SCRIPT, json.dumps(values), str(kill_at)]
    else:
        script = os.path.join(values["output_dir"] + "_script.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   script, json.dumps(values), str(kill_at)]
    return subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=240)


# --- the conditions come from the data ------------------------------------------------------------------


def test_size_and_crop_conditions_are_the_loaders(images, base):
    data = ImageFolderDataset(images, 32, center_crop=False, random_flip=True, buckets=make_buckets(32, 8), seed=3)
    flipped_somewhere = False
    for index in range(len(data)):
        for epoch in range(3):
            item = data.load(index, epoch)
            c = item["conditions"]
            with Image.open(data.records[index].path) as image:
                original = image.convert("RGB")
            assert c["original_size"] == (original.height, original.width)
            assert c["target_size"] == tuple(item["pixels"].shape[1:])  # (h, w) of the bucket
            th, tw = c["target_size"]
            # Redo the loader's work from the conditions alone: scale to cover, crop at (top, left).
            scale = max(tw / original.width, th / original.height)
            resized = original.resize((max(tw, round(original.width * scale)), max(th, round(original.height * scale))),
                                      Image.Resampling.BICUBIC, reducing_gap=3.0)
            top, left = c["crop_top_left"]
            straight = np.asarray(resized.crop((left, top, left + tw, top + th)))
            mirrored = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + tw, top + th)))
            pixels = ((item["pixels"].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
            # the crop of the mirrored image, where the item was flipped (sd-scripts' convention)
            assert np.array_equal(pixels, straight) or np.array_equal(pixels, mirrored)
            flipped_somewhere |= not np.array_equal(pixels, straight)
    assert flipped_somewhere

    # The trainer hands them to the family's conditioner as the time ids (B, 6), per process share.
    config = TrainConfig(**settings(base, images, images.parent / "unused", steps=1))
    trainer = Trainer(config)
    batch, noise = trainer._next_micro_batch()
    _, inputs, _, _ = trainer.task.inputs(batch, noise, 0)
    expected = [[*c["original_size"], *c["crop_top_left"], *c["target_size"]] for c in batch["conditions"]]
    assert inputs["time_ids"].tolist() == expected
    assert len({tuple(row) for row in expected}) > 1  # samples differ: not one constant for the batch


def test_shapes_items_condition_on_their_own_size():
    from sdlab.train.data import ShapesSource

    batch = collate([ShapesSource(32, 4).load(i) for i in range(2)])
    assert batch["conditions"] == [{"original_size": (32, 32), "crop_top_left": (0, 0), "target_size": (32, 32)}] * 2


# --- full fine-tuning: resume and DDP -------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at(step):
    def callback(trainer):
        if trainer.step == step:
            raise Crash  # after step `step`'s optimizer update, before any later checkpoint
    return callback


def test_full_finetune_resumes_bit_for_bit(base, images, tmp_path):
    """An interrupted run (its last step's work lost) resumed ends where an uninterrupted one does. In one
    process (tests/test_train_resume.py kills real processes with SIGKILL; this checks SDXL's state)."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    Trainer(TrainConfig(**settings(base, images, reference))).run()
    with pytest.raises(Crash):
        Trainer(TrainConfig(**settings(base, images, interrupted)), callbacks=[crash_at(3)]).run()
    assert final_state(interrupted)["step"] == 2  # the checkpoint of step 2: step 3 is lost
    resumed = Trainer(TrainConfig(**settings(base, images, interrupted)))
    assert resumed.step == 2
    resumed.run()
    a, b = final_state(reference), final_state(interrupted)
    assert a["step"] == b["step"] == 4
    assert set(a["trained"]) == {"unet", "text_encoder", "text_encoder_2"}
    for part in ("trained", "ema", "optimizer", "scheduler", "data", "rng"):
        assert_identical(a[part], b[part], part)
    assert a["data"]["epoch"] >= 1  # crossed an epoch: 2 batches of 4 per epoch, 2 micro-batches per step


def test_two_ddp_processes_match_one(images, tmp_path):
    """torchrun, gloo: 2 processes x batch 2 train what 1 process x batch 4 trains (the text encoders too,
    whose unused last CLIP-L layer DDP must be told about)."""
    common = dict(model="tiny-sdxl", init_from=None, adam_eps=1e-4, steps=1, save_every=0, ema_decay=0.0,
                  buckets=False)
    two = launch(settings(None, images, tmp_path / "two", batch_size=2, **common), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    torch.manual_seed(0)  # what the runs started from: the seed's fresh weights
    start = sdlab.Model.build(TINY_SDXL)
    one = Trainer(TrainConfig(**settings(None, images, tmp_path / "one", batch_size=4, **common)))
    one.run()
    rank0, rank1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    assert rank0.keys() == one.params.keys()
    moved = 0.0
    for name, single in one.params.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single.detach(), rtol=1e-4, atol=1e-5, msg=name)
        component, _, key = name.partition(".")
        moved = max(moved, float((single.detach() - start.components[component].state_dict()[key]).abs().max()))
    assert moved > 1e-4  # the weights moved


# --- LoRA ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_lora(base, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    config = TrainConfig(**settings(base, images, out, steps=3, save_every=0, lr=2e-2, ema_decay=0.0, lora_rank=4,
                                    lora_alpha=2.0, lora_text_encoder=True, train_text_encoder=False))
    trainer = Trainer(config)
    result = trainer.run()
    return trainer, result.exported[0]


def network_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([700, 30])


def denoised(model):
    """The UNet's output for fixed latents and two prompts, conditioned through both text encoders."""
    from sdlab.diffusion.conditioning import run_network
    from sdlab.families import family_of

    family = family_of(model.config)
    sizes = [{"original_size": (40, 30), "crop_top_left": (4, 0), "target_size": (32, 24)}] * 2
    inputs = family.conditioner_inputs(model, ["picture number 3", "a red circle"], sizes)
    with torch.no_grad():
        return run_network(model.unet, *network_inputs(), family.condition_from_inputs(model.components, inputs))


def test_lora_file_has_kohya_names_and_merges_to_the_trained_network(trained_lora, base):
    trainer, path = trained_lora
    assert path.name == "lora.safetensors"
    keys = load_file(path).keys()
    prefixes = {key.split("_")[0] + "_" + key.split("_")[1] + "_" for key in keys}
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)

    # What training computed (the adapters as hooks) is what the merged file computes.
    for network in trainer.model.components.values():
        network.eval()
    hooked = denoised(trainer.model)
    fresh = sdlab.load(base)
    plain = denoised(fresh)
    with apply_lora(fresh, path):
        merged = denoised(fresh)
    assert (merged - plain).abs().max() > 1e-3  # the LoRA acts
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)


def weights(network) -> dict[str, torch.Tensor]:
    """A network's state dict, text encoders' keys without `text_model.` (transformers 5 leaves it out)."""
    return {k.removeprefix("text_model."): v.clone() for k, v in network.state_dict().items()}


def test_diffusers_load_lora_weights_merges_the_same_weights(trained_lora, base):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    from diffusers import StableDiffusionXLPipeline

    _, path = trained_lora
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    before = {name: weights(getattr(pipe, name)) for name in ("unet", "text_encoder", "text_encoder_2")}
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="trained")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops PEFT's wrappers (plain state_dict names again)
    ours = sdlab.load(base)
    with apply_lora(ours, path):
        for name in ("unet", "text_encoder", "text_encoder_2"):
            mine, theirs = weights(ours.components[name]), weights(getattr(pipe, name))
            changed = {k for k in mine if not torch.equal(mine[k], before[name][k])}
            assert changed, name  # every network got updates
            assert changed == {k for k in theirs if not torch.equal(theirs[k], before[name][k])}, name
            for key in changed:
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_refiner_trains_on_its_five_numbers(images, tmp_path):
    """The refiner (no first text encoder): original size, crop and the aesthetic score (6 in training)."""
    config = TrainConfig(**settings(None, images, tmp_path / "refiner", init_from=None, model="tiny-sdxl-refiner",
                                    steps=1, grad_accum=1, save_every=0, export_layouts=["diffusers"]))
    trainer = Trainer(config)
    batch, noise = trainer._next_micro_batch()
    _, inputs, _, _ = trainer.task.inputs(batch, noise, 0)
    assert set(inputs) == {"text_encoder_2", "time_ids"}
    assert inputs["time_ids"].tolist() == [[*c["original_size"], *c["crop_top_left"], 6.0] for c in batch["conditions"]]
    trainer.run()
    assert final_state(tmp_path / "refiner")["model_config"]["text_encoder"] is None
    assert sdlab.load(tmp_path / "refiner" / "model").config.family == "sdxl-refiner"
