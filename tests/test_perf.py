"""The inference levers of `sdlab.perf` keep results right: fp32 levers match the plain path to float rounding
(and `sdlab.load` applies them by default, `plain=True` not), bf16 stays close to fp32, packed layers still
save and reload their weights, and the benchmark script runs end to end (on a tiny model)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sdlab
from sdlab import perf
from sdlab.adapters.patch import WeightPatches, read_weight
from sdlab.config import TINY
from sdlab.errors import ParameterError

PARAMS = sdlab.GenerationParams(prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=6,
                                sampler="DPM++ 2M", cfg_scale=3.0, seed=3)
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")


def _model() -> sdlab.Model:
    torch.manual_seed(0)
    return sdlab.Model.build(TINY)


def _unet_inputs(batch=2, side=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=gen)
    context = torch.randn(batch, 77, TINY.unet.context_dim, generator=gen)
    return x, torch.tensor([10.0, 700.0])[:batch], context


def _pixels(model) -> np.ndarray:
    return np.asarray(sdlab.generate(model, PARAMS).images[0], dtype=np.int16)


@needs_onednn
@torch.no_grad()
def test_fp32_levers_match_the_default_path():
    plain, fast = _model(), perf.optimize(_model())
    x, t, context = _unet_inputs()
    assert torch.allclose(fast.unet(x, t, context), plain.unet(x, t, context), atol=1e-5, rtol=0)
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(fast.vae.decode(z), plain.vae.decode(z), atol=1e-5, rtol=0)
    assert np.abs(_pixels(fast) - _pixels(plain)).max() <= 1


@needs_onednn
@torch.no_grad()
def test_packed_layers_work_at_any_size_and_under_autograd():
    plain, fast = _model(), perf.optimize(_model())
    for side in (8, 16, 8):  # packed at the first size, reused at the others
        x, t, context = _unet_inputs(batch=1, side=side)
        assert torch.allclose(fast.unet(x, t, context), plain.unet(x, t, context), atol=1e-5, rtol=0)
    assert isinstance(fast.unet.conv_in, perf.PackedConv2d) and fast.unet.conv_in.packed is not None
    with torch.enable_grad():  # falls back to the plain op on the unpacked weight
        x, t, context = _unet_inputs(batch=1)
        x.requires_grad_(True)
        fast.unet(x, t, context).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_onednn
@torch.no_grad()
def test_packed_weights_save_reload_and_unpack_exactly(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    perf.optimize(model)
    model.unet(*_unet_inputs())  # packs every layer that runs
    assert model.unet.down_blocks[0].resnets[0].conv1.packed is not None
    after = model.unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    reloaded = sdlab.load(model.save(tmp_path / "m"))
    assert all(torch.equal(reloaded.unet.state_dict()[k], before[k]) for k in before)
    perf.unpack(model.unet)
    assert type(model.unet.conv_in) is torch.nn.Conv2d
    assert all(torch.equal(model.unet.state_dict()[k], before[k]) for k in before)


def _packable_layers() -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(2)
    layers = {"linear": torch.nn.Linear(16, 8), "conv": torch.nn.Conv2d(8, 4, 3, padding=1)}
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            layer.requires_grad_(False)
    return layers


def _layer_input(layer: torch.nn.Module) -> torch.Tensor:
    shape = (2, 16) if isinstance(layer, torch.nn.Linear) else (1, 8, 6, 6)
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@needs_onednn
@pytest.mark.parametrize("kind", ["linear", "conv"])
@torch.no_grad()
def test_set_weight_replaces_a_packed_weight_and_packs_it_again(kind):
    layer = _packable_layers()[kind]
    perf.prepack(layer)
    x = _layer_input(layer)
    layer(x)
    keys = list(layer.state_dict())
    assert layer.packed is not None and keys == ["weight", "bias"]
    new = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(4))
    layer.set_weight(new)
    assert layer.packed is None and torch.equal(layer.weight, new)
    expected = torch.nn.functional.linear(x, new, layer.bias) if kind == "linear" else \
        torch.nn.functional.conv2d(x, new, layer.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=0)
    assert layer.packed is not None  # packed again at that call
    assert list(layer.state_dict()) == keys and torch.equal(layer.state_dict()["weight"], new)


@needs_onednn
@pytest.mark.parametrize("state", ["plain", "packs-at-first-call", "packed"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@torch.no_grad()
def test_weight_patches_replace_and_restore_any_layer_bit_for_bit(kind, state):
    """The one mechanism LoRA merging uses: plain layers are written in place, packed ones through
    set_weight; restoring gives back the exact weights, outputs and state_dict."""
    layer, twin = _packable_layers()[kind], _packable_layers()[kind]  # twin: the same layer, never patched
    x = _layer_input(layer)
    for each in (layer, twin):
        if state != "plain":
            perf.prepack(each)
        if state == "packed":
            each(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    patches = WeightPatches()
    changed = read_weight(layer) + 0.5
    patches.replace(layer, changed)
    assert torch.equal(read_weight(layer), changed)
    assert (layer(x) - twin(x)).abs().max() > 0.1  # the patch is what runs
    patches.replace(layer, changed * 2)  # a second patch of the same layer keeps the true original
    patches.restore()
    assert len(patches) == 0
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer(x), twin(x))


@needs_onednn
def test_bf16_image_is_close_to_fp32():
    fp32 = _pixels(_model())
    bf16_model = perf.optimize(_model(), dtype=torch.bfloat16)
    assert bf16_model.dtype == torch.bfloat16 and next(bf16_model.text_encoder.parameters()).dtype == torch.bfloat16
    diff = np.abs(_pixels(bf16_model) - fp32)
    assert fp32.std() > 10  # a flat image would prove nothing
    assert diff.mean() < 3 and diff.max() <= 40, (diff.mean(), diff.max())


def test_convert_dtype_converts_every_float_tensor_and_nothing_else():
    model = _model()
    perf.convert_dtype(model.text_encoder, torch.bfloat16)
    tensors = list(model.text_encoder.parameters()) + list(model.text_encoder.buffers())
    assert all(t.dtype == torch.bfloat16 for t in tensors if t.is_floating_point())
    assert all(not t.requires_grad for t in model.text_encoder.parameters())


def test_optimize_rejects_an_unknown_dtype():
    with pytest.raises(ParameterError, match="dtype"):
        perf.optimize(_model(), dtype=torch.int8)


@needs_onednn
def test_benchmark_quick_run_on_a_tiny_model(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import inference

    folder = _model().save(tmp_path / "tiny")
    out = tmp_path / "table.md"
    inference.main(["--quick", "--model", str(folder), "--size", "64", "--steps", "2", "--gens", "1",
                    "--threads", "1", "--precisions", "fp32", "--markdown", str(out)])
    table = out.read_text()
    for row in ("| sdlab | fp32 |", "| diffusers | fp32 |"):
        assert row in table
    fp32_row = next(line for line in table.splitlines() if line.startswith("| sdlab | fp32 |"))
    assert fp32_row.split("|")[-2].strip() in ("0", "1")  # sdlab fp32 == diffusers fp32 to 1/255


def test_loading_in_bf16_converts_every_weight_exactly(tmp_path):
    model = _model()
    folder = model.save(tmp_path / "m")
    loaded = sdlab.load(folder, dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(model, name).state_dict()
        for key, value in theirs.items():
            expected = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert ours[key].dtype == expected.dtype and torch.equal(ours[key], expected), key


def test_release_pages_keeps_a_memory_mapped_tensor_readable(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "w.safetensors")
    w = load_file(tmp_path / "w.safetensors")["w"]
    total = float(w.sum())
    perf.release_pages(w)  # the pages are dropped, not the data: it is read from the file again
    assert float(w.sum()) == total


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without CUDA")
def test_gpu_benchmark_skips_cleanly_without_cuda(capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import inference

    assert inference.main(["--device", "cuda"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


@needs_onednn
def test_loading_is_fast_by_default_and_plain_on_request(tmp_path, caplog):
    """`sdlab.load` packs the UNet's and VAE's layers (fp32 images within float rounding of the plain path);
    `plain=True` leaves them as built; training-style use (gradients on) of a packed model warns, since packed
    weights are not parameters; moving off the CPU unpacks."""
    import logging

    path = _model().save(tmp_path / "m.safetensors", layout="single-file")
    fast, plain = sdlab.load(path), sdlab.load(path, plain=True)
    assert isinstance(fast.unet.conv_in, perf.PackedConv2d) and isinstance(fast.vae.decoder.conv_in, perf.PackedConv2d)
    assert not any(isinstance(m, perf._PackedWeight) for net in plain.components.values() for m in net.modules())
    assert np.abs(_pixels(fast) - _pixels(plain)).max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(fast.unet.state_dict().values(), plain.unet.state_dict().values()))
    assert sdlab.Model.from_name("random:tiny", plain=True).unet.conv_in.__class__ is torch.nn.Conv2d
    assert isinstance(sdlab.Model.from_name("random:tiny").unet.conv_in, perf.PackedConv2d)
    x, t, context = _unet_inputs()
    perf._warned.clear()  # (said once per process: an earlier test may have run a packed layer with gradients)
    with caplog.at_level(logging.WARNING, logger="sdlab.perf"):
        with torch.enable_grad():
            fast.unet(x, t, context)
    assert "gets no gradient" in caplog.text and "plain=True" in caplog.text
    fast.to(device="meta")
    assert not any(isinstance(m, perf._PackedWeight) for m in fast.unet.modules())


def test_cli_and_server_take_the_plain_path_on_request(monkeypatch, tmp_path):
    """`sdlab generate --plain` and `sdlab serve --plain` load models with plain=True (and without, fast)."""
    from sdlab import cli
    from sdlab.server import registry

    loads = []
    original = sdlab.Model.from_name.__func__

    def recording(cls, name=None, **options):
        loads.append(options.get("plain"))
        return original(cls, name, **options)

    monkeypatch.setattr(sdlab.Model, "from_name", classmethod(recording))
    for flags in ([], ["--plain"]):
        assert cli.main(["generate", "x", "--model", "random:tiny", "--size", "64x64", "--steps", "1", "-q",
                         "--out", str(tmp_path / str(len(flags))), *flags]) == 0
    assert loads == [False, True]
    settings = cli.build_parser().parse_args(["serve", "--plain"])
    served = []
    monkeypatch.setattr("sdlab.server.serve", lambda s: served.append(s) or 0)
    assert cli.cmd_serve(settings) == 0 and served[0].plain is True and served[0].low_memory is False
    loads.clear()
    registry.ModelRegistry(served[0]).load("builtin")
    assert loads == [True]
