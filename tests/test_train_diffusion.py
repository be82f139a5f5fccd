"""The diffusion objective (checked against diffusers' DDPMScheduler), Min-SNR, offset noise, caption dropout,
LR schedule, EMA, bf16, LoRA and text-encoder training through the Trainer, and sample grids."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from sdlab.config import SD15
from sdlab.errors import ParameterError
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.lora import read_lora
from sdlab.train import TrainConfig, Trainer
from sdlab.train.diffusion import draw_noise, noised, snr_weights, target
from sdlab.train.ema import EMA
from sdlab.train.loop import lr_factor


def tiny_config(tmp_path, **changes):
    values = dict(model="tiny", data="shapes", shapes_length=8, resolution=32, steps=2, batch_size=2, lr=1e-3,
                  save_every=0, log_every=1, output_dir=str(tmp_path / "run"), progress_bar=False,
                  export_layouts=(), resume=False)
    values.update(changes)
    return TrainConfig(**values)


def test_forward_process_and_targets_match_diffusers():
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    alphas_cumprod = NoiseSchedule.from_config(SD15.schedule).alphas_cumprod
    torch.testing.assert_close(alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    a = alphas_cumprod[t]
    torch.testing.assert_close(noised(x0, eps, a), reference.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target(x0, eps, a, "v_prediction"), reference.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(target(x0, eps, a, "epsilon"), eps)


def test_min_snr_weights():
    a = torch.tensor([0.99, 0.5, 0.01])
    snr = a / (1 - a)  # 99, 1, 0.0101
    torch.testing.assert_close(snr_weights(a, 5.0, "epsilon"), torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(snr_weights(a, 5.0, "v_prediction"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert torch.equal(snr_weights(a, 0.0, "epsilon"), torch.ones(3))
    assert snr_weights(a, 5.0, "epsilon")[0] == pytest.approx(5 / 99)  # low noise is down-weighted


def test_draws_are_reproducible_and_options_do_not_shift_the_stream():
    draw = lambda **kw: draw_noise(torch.Generator().manual_seed(3), 6, (4, 8, 8), 1000, **kw)
    plain, offset, dropped = draw(), draw(offset_noise=0.1), draw(caption_dropout=1.0)
    assert torch.equal(plain.timesteps, offset.timesteps) and torch.equal(plain.posterior, dropped.posterior)
    shift = offset.noise - plain.noise  # offset noise: one constant per (sample, channel)
    assert shift.abs().max() > 0 and torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert dropped.drop_caption.all() and not plain.drop_caption.any()
    rows = plain.rows(2, 4)
    assert torch.equal(rows.noise, plain.noise[2:4]) and torch.equal(rows.timesteps, plain.timesteps[2:4])
    rate = draw_noise(torch.Generator().manual_seed(0), 4000, (1, 1, 1), 10, caption_dropout=0.1).drop_caption
    assert 0.08 < rate.float().mean() < 0.12


def test_lr_schedule():
    c = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(c, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(c, 10) == pytest.approx(1.0)
    assert lr_factor(c, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(c, 110) == pytest.approx(0.1)
    assert lr_factor(c.replace(lr_schedule="constant"), 100) == 1.0
    wsd = c.replace(lr_schedule="constant", cooldown_steps=20, min_lr_ratio=0.0)  # warmup-stable-decay
    assert [lr_factor(wsd, s) for s in (10, 89)] == [1.0, 1.0]
    assert [lr_factor(wsd, s) for s in (90, 99, 109)] == pytest.approx([0.95, 0.5, 0.0])
    # the steps before the cool-down do not depend on the length: a run can be lengthened, then cooled down
    assert all(lr_factor(wsd.replace(steps=500), s) == lr_factor(wsd, s) for s in range(90))
    with pytest.raises(ParameterError, match="cooldown_steps"):
        TrainConfig(steps=110, lr_schedule="cosine", cooldown_steps=10)
    with pytest.raises(ParameterError, match="must not exceed steps"):
        TrainConfig(steps=110, warmup_steps=100, lr_schedule="constant", cooldown_steps=20)


def test_ema():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.99)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # warm-up decay min(0.99, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["p"], torch.full((3,), 0.9))
    with ema.swapped_in():
        assert torch.equal(p.data, torch.full((3,), 0.9))
    assert torch.equal(p.data, torch.ones(3))
    restored = EMA({"p": p}, decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["p"], ema.shadow["p"])


def fixed_eval_loss(trainer, batch, noise):
    with torch.no_grad():
        return float(trainer.task.objective(*trainer.task.inputs(batch, noise, 0))[0])


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, shapes_length=2, steps=30, lr=3e-3, caption_dropout=0.0))
    batch, _ = trainer._next_micro_batch()
    noise = trainer.task.draw(torch.Generator().manual_seed(9), 2, batch["pixels"].shape)
    before = fixed_eval_loss(trainer, batch, noise)
    result = trainer.run()
    after = fixed_eval_loss(trainer, batch, noise)
    assert after < 0.8 * before, (before, after)
    records = trainer.loss_log.read()
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "lr", "samples_per_s", "grad_norm", "epoch"} <= set(records[-1])
    assert result.metrics["step"] == 30


def test_caption_dropout_trains_on_the_empty_prompt(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, caption_dropout=1.0))
    batch, noise = trainer._next_micro_batch()
    _, conditions, _, _ = trainer.task.inputs(batch, noise, 0)
    empty = trainer.model.tokenizer([""] * 2)
    assert torch.equal(conditions["text_encoder"], empty)


def test_bf16_autocast_matches_fp32_loosely(tmp_path):
    losses = {}
    for precision in ("no", "bf16"):
        trainer = Trainer(tiny_config(tmp_path / precision, precision=precision, steps=1))
        losses[precision] = trainer.train_step()[0]
    assert math.isfinite(losses["bf16"]) and losses["bf16"] == pytest.approx(losses["no"], rel=0.05)


def test_frozen_and_trained_parts(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_text_encoder=True, steps=1, prediction="v_prediction"))
    assert trainer.model.config.prediction == "v_prediction"
    te_before = {k: v.clone() for k, v in trainer.model.text_encoder.state_dict().items()}
    vae_before = {k: v.clone() for k, v in trainer.model.vae.state_dict().items()}
    trainer.run()
    assert any(not torch.equal(v, te_before[k]) for k, v in trainer.model.text_encoder.state_dict().items())
    assert all(torch.equal(v, vae_before[k]) for k, v in trainer.model.vae.state_dict().items())
    assert not any(n.startswith("vae") for n in trainer.params)


def test_lora_training_touches_only_the_adapters(tmp_path):
    config = tiny_config(tmp_path, lora_rank=2, lora_alpha=4.0, lora_text_encoder=True, steps=2, lr=1e-2,
                         export_layouts=("diffusers",))
    trainer = Trainer(config)
    base = {f"{n}.{k}": v.clone() for n in ("unet", "text_encoder") for k, v in getattr(trainer.model, n).state_dict().items()}
    assert trainer.params and all(".adapters." in n for n in trainer.params)
    result = trainer.run()
    after = {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in getattr(trainer.model, n).state_dict().items()}
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert result.exported == [tmp_path / "run" / "lora.safetensors"]
    lora = read_lora(result.exported[0])
    assert any(name.startswith("lora_te_") for name in lora) and all(m.alpha == 4.0 for m in lora.values())
    assert any(m.up.abs().max() > 0 for m in lora.values())  # the up projections left zero


def test_sample_grid_and_loss_plot(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=2, sample_every=2, sample_steps=2,
                                  sample_prompts=("a red circle", "a blue square")))
    trainer.run()
    grid = Image.open(tmp_path / "run" / "samples" / "step-00000002.png")
    assert grid.size == (64, 32)
    plot = Image.open(tmp_path / "run" / "loss.png")
    assert plot.size == (640, 360)


def test_training_builds_its_conditioning_with_the_familys_conditioner(tmp_path, monkeypatch):
    """The objective's conditioning is what the family's conditioner gives for the captions (as train
    sampling's is), and per-sample extra conditions from the data reach the family."""
    trainer = Trainer(tiny_config(tmp_path, steps=1))
    family, model = trainer.task.family, trainer.model
    batch, noise = trainer._next_micro_batch()
    seen = []
    plain = family.conditioner_inputs
    monkeypatch.setattr(family, "conditioner_inputs", lambda m, p, extras=None: seen.append(extras) or plain(m, p))
    batch = {**batch, "conditions": [{"original_size": (64, 64)}] * len(batch["caption"])}
    _, conditions, _, _ = trainer.task.inputs(batch, noise, 0)
    assert seen == [batch["conditions"]]
    with torch.no_grad():
        cond = trainer.task.objective.condition(conditions)
        expected = family.condition_from_inputs(model.components, plain(model, list(batch["caption"])))
    assert torch.equal(cond.context, expected.context)
