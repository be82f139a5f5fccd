"""Training data: captions from .txt or metadata.jsonl, skipped files counted and reported, crops, buckets,
the batch order and its restorable position, the shapes source, the latent cache."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.config import TINY
from sdlab.errors import ParameterError
from sdlab.nn.vae import VAE
from sdlab.shapes import ShapesMix
from sdlab.train.data import (
    BatchOrder,
    DataStream,
    ImageFolderDataset,
    ShapesSource,
    fit,
    make_buckets,
    nearest_bucket,
    scan_folder,
)
from sdlab.train.latents import LatentCache, fingerprint


def write_image(path, size=(40, 24), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_sidecar_captions_and_skips_are_counted_and_warned(tmp_path, caplog):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red thing \n")
    write_image(tmp_path / "sub" / "b.jpg", size=(24, 40))
    (tmp_path / "sub" / "b.txt").write_text("a tall thing")
    write_image(tmp_path / "no_caption.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.txt").write_text("never used")
    (tmp_path / "notes.md").write_text("ignored: not an image")
    with caplog.at_level(logging.WARNING):
        records, skipped = scan_folder(tmp_path)
    assert [(r.path.name, r.caption, r.size) for r in records] == [("a.png", "a red thing", (40, 24)),
                                                                    ("b.jpg", "a tall thing", (24, 40))]
    assert dict(skipped.counts) == {"unreadable image": 1, "no caption": 1}
    assert skipped.total == 2
    assert "skipped 1 images (unreadable image)" in caplog.text and "broken.png" in caplog.text
    assert "skipped 1 images (no caption)" in caplog.text


def test_metadata_jsonl_captions(tmp_path):
    write_image(tmp_path / "x" / "one.png")
    write_image(tmp_path / "two.png")
    write_image(tmp_path / "three.png")
    lines = [{"file_name": "x/one.png", "text": "first"}, {"file_name": "two.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    data = ImageFolderDataset(tmp_path, 16)
    assert sorted(r.caption for r in data.records) == ["first", "second"]
    assert data.skipped.counts == {"no caption": 1}
    item = data.load(0)
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.float32
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "two.png"}\n')
    with pytest.raises(ParameterError, match=r"metadata.jsonl, line 1.*'text'"):
        scan_folder(tmp_path)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ParameterError, match="no such folder"):
        scan_folder(tmp_path / "nope")
    write_image(tmp_path / "a.png")
    with pytest.raises(ParameterError, match="no usable images"):
        scan_folder(tmp_path)


def test_crops_pixels_and_determinism(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, :20] = 255  # white left third, black elsewhere
    Image.fromarray(array).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    centre = ImageFolderDataset(tmp_path, 20).load(0)["pixels"]
    assert centre.min() == -1 and centre.max() == -1  # the centre crop of a 60x20 image is the black middle
    random_crop = ImageFolderDataset(tmp_path, 20, center_crop=False, random_flip=True, seed=3)
    crops = [random_crop.load(0, epoch)["pixels"] for epoch in range(8)]
    assert any(c.max() > 0 for c in crops) and any(c.max() < 0 for c in crops)  # offsets vary with the epoch
    again = ImageFolderDataset(tmp_path, 20, center_crop=False, random_flip=True, seed=3)
    assert all(torch.equal(c, again.load(0, e)["pixels"]) for e, c in enumerate(crops))  # a function of (seed, epoch)
    image = Image.new("RGB", (100, 50))
    assert fit(image, (32, 32), None).size == (32, 32)


def test_buckets():
    buckets = make_buckets(64, 8)
    assert (64, 64) in buckets and all(w % 8 == 0 and h % 8 == 0 for w, h in buckets)
    assert all(w * h <= 64 * 64 and 0.5 <= w / h <= 2 for w, h in buckets)
    assert nearest_bucket((300, 150), buckets)[0] > nearest_bucket((300, 150), buckets)[1]
    assert nearest_bucket((100, 100), buckets) == (64, 64)


def test_bucketed_batches_hold_one_size(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"w{i}.png", size=(80, 40))
        write_image(tmp_path / f"t{i}.png", size=(40, 80))
    for p in tmp_path.glob("*.png"):
        p.with_suffix(".txt").write_text("c")
    data = ImageFolderDataset(tmp_path, 32, buckets=make_buckets(32, 8))
    order = BatchOrder(len(data), 3, seed=0, sizes=data.sizes)
    assert order.batches_per_epoch == 4
    for batch in order.epoch(0):
        assert len({data.sizes[i] for i in batch}) == 1
    shapes = {tuple(data.load(i)["pixels"].shape) for i in range(len(data))}
    assert len(shapes) == 2


def test_batch_order_and_stream_state():
    order = BatchOrder(10, 3, seed=5)
    epoch0 = order.epoch(0)
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)
    assert len({i for b in epoch0 for i in b}) == 9  # no repeats within an epoch
    assert order.epoch(0) == epoch0 and order.epoch(1) != epoch0
    stream = DataStream(order)
    seen = [stream.next() for _ in range(5)]
    state = stream.state_dict()
    rest = [stream.next() for _ in range(4)]
    resumed = DataStream(order)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(4)] == rest
    assert [e for e, _ in seen + rest] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ParameterError, match="too few"):
        BatchOrder(2, 3, seed=0)


def test_shapes_source_and_latent_cache(tmp_path):
    source = ShapesSource(32, length=5, seed=1)
    item = source.load(2)
    assert item["pixels"].shape == (3, 32, 32) and isinstance(item["caption"], str) and item["caption"]
    assert torch.equal(source.load(2, epoch=7)["pixels"], item["pixels"])
    torch.manual_seed(0)
    vae = VAE(TINY.vae).eval()
    key = fingerprint(vae, source, 32)
    cache = LatentCache.build(source, vae, batch_size=2)
    mean, logvar = cache.get([2, 4])
    with torch.no_grad():
        direct, _ = vae.encode(torch.stack([source.load(2)["pixels"], source.load(4)["pixels"]]))
    torch.testing.assert_close(mean, direct, rtol=1e-4, atol=1e-5)  # batch composition differs
    cache.save(tmp_path / "c.safetensors", key)
    loaded = LatentCache.load(tmp_path / "c.safetensors", key)
    assert torch.equal(loaded.get([2, 4])[0], mean) and torch.equal(loaded.get([2, 4])[1], logvar)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)  # the decoder does not matter, the encoder does
        vae.encoder.conv_out.bias.add_(1.0)
    assert LatentCache.load(tmp_path / "c.safetensors", fingerprint(vae, source, 32)) is None
    # Another training mix draws other scenes, so it must not reuse the cache.
    assert fingerprint(vae, source, 32) != fingerprint(vae, ShapesSource(32, length=5, seed=1, mix=ShapesMix(
        relation_share=1.0)), 32)


def test_trainer_on_bucketed_folders_cached_latents_and_vae_heldout_split(tmp_path):
    from sdlab.train import TrainConfig, Trainer

    folder = tmp_path / "images"
    for i in range(4):
        write_image(folder / f"w{i}.png", size=(48, 24), colour=(40 * i, 100, 200))
        write_image(folder / f"t{i}.png", size=(24, 48), colour=(200, 40 * i, 100))
    for p in folder.glob("*.png"):
        p.with_suffix(".txt").write_text("a coloured rectangle")
    common = dict(model="tiny", data=str(folder), resolution=16, batch_size=2, save_every=0, progress_bar=False,
                  export_layouts=(), resume=False)
    bucketed = Trainer(TrainConfig(buckets=True, steps=4, output_dir=str(tmp_path / "b"), **common))
    assert len(set(bucketed.source.sizes)) == 2
    bucketed.run()  # batches of one size each; both sizes occur in an epoch

    losses = {}
    for cached in (False, True):
        trainer = Trainer(TrainConfig(cache_latents=cached, steps=1, output_dir=str(tmp_path / f"c{cached}"), **common))
        losses[cached] = trainer.train_step()[0]
    assert (tmp_path / "cTrue" / "latent_cache.safetensors").is_file()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)

    vae = Trainer(TrainConfig(task="vae", eval_fraction=0.25, steps=1, output_dir=str(tmp_path / "v"), **common))
    assert len(vae.source) == 6 and vae.task.eval_pixels.shape == (2, 3, 16, 16)

