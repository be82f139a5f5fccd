"""The T2I-Adapter network: diffusers' T2IAdapter's keys and outputs for its three adapter types, read from
diffusers folders and from the original TencentARC single files (built here from the key table), bad input refused."""

import json

import pytest
import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter
from safetensors.torch import save_file

from sdlab.errors import CheckpointError, ParameterError
from sdlab.nn.t2i_adapter import (
    T2IAdapter,
    T2IAdapterConfig,
    load_t2i_adapter,
    original_key_map,
    read_t2i_adapter,
)

TINY = {
    "full_adapter": dict(channels=(32, 64, 64, 64), num_res_blocks=2, downscale_factor=8),
    "full_adapter_xl": dict(channels=(32, 64, 64, 64), num_res_blocks=2, downscale_factor=16),
    "light_adapter": dict(channels=(32, 64, 64), num_res_blocks=3, downscale_factor=8),
}


def reference(adapter_type: str, in_channels: int = 3) -> DiffusersT2IAdapter:
    """A diffusers T2IAdapter with random weights of std 0.1, so that every tensor's mapping shows in the outputs."""
    config = TINY[adapter_type]
    model = DiffusersT2IAdapter(in_channels=in_channels, channels=list(config["channels"]),
                                num_res_blocks=config["num_res_blocks"],
                                downscale_factor=config["downscale_factor"], adapter_type=adapter_type).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def assert_same_features(ours, theirs, image):
    with torch.no_grad():
        expected, got = theirs(image), ours(image)
    assert [f.shape for f in got] == [f.shape for f in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter_type", list(TINY))
def test_matches_diffusers_on_the_same_weights(adapter_type):
    theirs = reference(adapter_type)
    ours = T2IAdapter(T2IAdapterConfig(adapter_type=adapter_type, **TINY[adapter_type])).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.total_downscale_factor == theirs.total_downscale_factor
    assert_same_features(ours, theirs, torch.rand(2, 3, 64, 64))
    assert_same_features(ours, theirs, torch.rand(1, 3, 48, 80))  # sizes that the 2x pools round up


def test_default_configs_have_diffusers_shapes():
    """The real sizes, on the meta device: SD 1.5's full adapter and SDXL's, and the original light adapter's."""
    for adapter_type, extra in [("full_adapter", {}), ("full_adapter_xl", dict(downscale_factor=16)),
                                ("light_adapter", dict(channels=(320, 640, 1280), num_res_blocks=4))]:
        with torch.device("meta"):
            theirs = DiffusersT2IAdapter(adapter_type=adapter_type, **extra)
            ours = T2IAdapter(T2IAdapterConfig(adapter_type=adapter_type, **extra))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        assert ours.total_downscale_factor == theirs.total_downscale_factor


@pytest.mark.parametrize("adapter_type", list(TINY))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_reads_a_diffusers_folder(tmp_path, adapter_type, safe):
    theirs = reference(adapter_type, in_channels=1)
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    cfg, tensors = read_t2i_adapter(tmp_path)
    assert cfg == T2IAdapterConfig(in_channels=1, adapter_type=adapter_type, **TINY[adapter_type])
    assert tensors.keys() == theirs.state_dict().keys()
    ours = load_t2i_adapter(tmp_path)
    assert not ours.training
    assert_same_features(ours, theirs, torch.rand(1, 1, 64, 32))
    half = load_t2i_adapter(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.parametrize("adapter_type", ["full_adapter", "light_adapter"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_reads_an_original_tencentarc_file(tmp_path, adapter_type, suffix):
    theirs = reference(adapter_type)
    cfg = T2IAdapterConfig(adapter_type=adapter_type, **TINY[adapter_type])
    original = {old: theirs.state_dict()[new].clone() for new, old in original_key_map(cfg).items()}
    assert ("body.2.in_conv.weight" if adapter_type == "full_adapter" else "body.0.body.2.block2.bias") in original
    path = tmp_path / f"t2iadapter{suffix}"
    torch.save(original, path) if suffix == ".pth" else save_file(original, path)
    read_cfg, _ = read_t2i_adapter(path)
    assert read_cfg == cfg
    assert_same_features(load_t2i_adapter(path), theirs, torch.rand(1, 3, 64, 64))


def test_original_full_adapter_keys_follow_diffusers_conversion():
    """Spot checks against diffusers' scripts/convert_original_t2i_adapter.py (SD 1.5, 2 res blocks a level)."""
    full = original_key_map(T2IAdapterConfig())
    assert full["adapter.body.0.resnets.1.block2.bias"] == "body.1.block2.bias"
    assert full["adapter.body.2.in_conv.weight"] == "body.4.in_conv.weight"
    assert full["adapter.body.3.resnets.1.block1.weight"] == "body.7.block1.weight"
    light = original_key_map(T2IAdapterConfig(channels=(320, 640, 1280), num_res_blocks=4, adapter_type="light_adapter"))
    assert light["adapter.body.3.resnets.3.block2.weight"] == "body.3.body.3.block2.weight"
    assert light["adapter.body.1.out_conv.bias"] == "body.1.out_conv.bias"


@pytest.mark.parametrize("config, field", [
    (dict(adapter_type="medium_adapter"), "full_adapter_xl"),
    (dict(channels="320"), "channels"),
    (dict(channels=[320, 64.0]), "channels"),
    (dict(in_channels="3"), "in_channels"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(downscale_factor=True), "downscale_factor"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ParameterError, match=field):
        T2IAdapterConfig.from_diffusers(config)


def test_bad_config_in_a_folder_names_the_file(tmp_path):
    reference("full_adapter").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "adapter_type": "huge"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*adapter_type"):
        read_t2i_adapter(tmp_path)


def test_wrong_keys_are_refused_naming_the_file_and_keys(tmp_path):
    cfg = T2IAdapterConfig(**TINY["full_adapter"])
    ours = T2IAdapter(cfg).state_dict()
    good = {old: torch.zeros_like(ours[new]) for new, old in original_key_map(cfg).items()}
    bad = {**{k: v for k, v in good.items() if k != "body.3.block2.bias"}, "body.3.skep.weight": torch.zeros(1)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*missing 'adapter\.body\.1\.resnets\.1\.block2\.bias'"
                                              r".*unexpected 'body\.3\.skep\.weight'"):
        load_t2i_adapter(tmp_path / "bad.safetensors")
    save_file({**good, "conv_in.weight": torch.zeros(32, 192, 1, 1)}, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match="wrong shape"):
        read_t2i_adapter(tmp_path / "shape.safetensors")
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="original TencentARC layout"):
        read_t2i_adapter(tmp_path / "other.safetensors")


def test_input_of_the_wrong_shape_is_refused():
    adapter = T2IAdapter(T2IAdapterConfig(**TINY["full_adapter"]))
    with pytest.raises(ParameterError, match="multiples of 8"):
        adapter(torch.rand(1, 3, 60, 64))
