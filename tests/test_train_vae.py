"""VAE training: KL and reconstruction terms, the patch discriminator switched on after its warm-up with each
player trained on its own loss, held-out PSNR that improves, and the exported latent scaling factor."""

import pytest
import torch
import torch.nn.functional as F

from sdlab.config import TINY
from sdlab.model import Model
from sdlab.nn.vae import VAE
from sdlab.train import TrainConfig, Trainer
from sdlab.train.vae import PatchDiscriminator, VAEObjective, kl_divergence, psnr


def test_kl_divergence():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_divergence(mean, logvar), torch.zeros(2))
    mean[1, 0, 0, 0], logvar[1, 1, 0, 0] = 2.0, 1.0
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element
    expected = 0.5 * (4.0) + 0.5 * (torch.e - 1 - 1)
    assert kl_divergence(mean, logvar)[1].item() == pytest.approx(expected)


def test_patch_discriminator_shape():
    logits = PatchDiscriminator(3, channels=16, layers=2)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> (stride 1) 7 -> 6


def test_each_player_gets_only_its_own_gradient():
    torch.manual_seed(0)
    objective = VAEObjective(VAE(TINY.vae), recon_loss="l2", kl_weight=1e-3, disc_weight=0.5,
                             disc_layers=1)
    pixels, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    _, metrics_off = objective(pixels, noise, adversarial=False)
    assert set(metrics_off) == {"rec", "kl"}
    loss, metrics = objective(pixels, noise, adversarial=True)
    assert set(metrics) == {"rec", "kl", "gen", "disc"}
    loss.backward()
    disc_grads = [p.grad.clone() for p in objective.discriminator.parameters()]
    vae_grads = [p.grad.clone() for p in objective.vae.parameters()]
    objective.zero_grad()
    # reference: the discriminator's hinge loss alone for it; reconstruction + KL + generator term for the VAE
    mean, logvar = objective.vae.encode(pixels)
    recon = objective.vae.decode(mean + torch.exp(0.5 * logvar) * noise)
    d = objective.discriminator
    disc_loss = F.relu(1 - d(pixels)).mean() + F.relu(1 + d(recon.detach())).mean()
    for got, want in zip(disc_grads, torch.autograd.grad(disc_loss, list(d.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    vae_loss = (F.mse_loss(recon, pixels) + 1e-3 * kl_divergence(mean, logvar).mean() / pixels[0].numel()
                - 0.5 * d(recon).mean())
    reference = torch.autograd.grad(vae_loss, list(objective.vae.parameters()))
    for got, want in zip(vae_grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_vae_training_improves_heldout_psnr_and_sets_the_scaling_factor(tmp_path):
    config = TrainConfig(task="vae", model="tiny", data="shapes", shapes_length=16, resolution=32, batch_size=4,
                         steps=25, lr=2e-3, kl_weight=1e-6, disc_weight=0.1, disc_start=20, eval_every=25,
                         eval_size=8, save_every=0, output_dir=str(tmp_path / "vae"), progress_bar=False,
                         export_layouts=("diffusers",))
    trainer = Trainer(config)
    eval_pixels = trainer.task.eval_pixels
    assert eval_pixels.shape == (8, 3, 32, 32)
    before = psnr(trainer.model.vae.eval(), eval_pixels)
    result = trainer.run()
    after = result.metrics["psnr"]
    assert after > before + 3.0, (before, after)
    logged = trainer.loss_log.read()
    assert any("psnr" in r for r in logged)
    assert "gen" in logged[-2] and "gen" not in logged[0]  # the adversarial term starts at disc_start
    assert "discriminator" in trainer.task.trained
    saved = Model.load(tmp_path / "vae" / "model")
    factor = saved.config.vae.scaling_factor
    assert factor != TINY.vae.scaling_factor and factor > 0
    with torch.no_grad():
        mean, _ = saved.vae.encode(eval_pixels)
    assert (mean * factor).std().item() == pytest.approx(1.0, rel=1e-3)
