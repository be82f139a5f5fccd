"""ControlNet preprocessors and control-image resizing (sdlab.control.preprocess), checked on small synthetic
pictures: each detector against the property it exists for, "Just Resize" against diffusers, the inpaint hint
against diffusers' `make_inpaint_condition` formula, and the error messages."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdlab.control import preprocess as P
from sdlab.errors import ParameterError


def _square(size=64, box=(16, 16, 47, 47)):
    """A black filled square on white: its border is the only edge."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle(box, fill="black")
    return image


def _noisy(w=48, h=40, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- registry and errors


def test_registry_lists_the_extension_modules_with_their_sliders():
    assert list(P.PREPROCESSORS) == ["none", "canny", "invert", "scribble_xdog", "lineart_standard",
                                     "tile_resample", "blur_gaussian", "shuffle", "depth_midas", "openpose",
                                     "lineart_realistic"]
    canny = P.PREPROCESSORS["canny"]
    assert (canny.threshold_a.default, canny.threshold_a.minimum, canny.threshold_a.maximum) == (100, 1, 255)
    assert (canny.threshold_b.default, canny.threshold_b.minimum, canny.threshold_b.maximum) == (200, 1, 255)
    assert P.PREPROCESSORS["scribble_xdog"].threshold_a.default == 32
    assert P.PREPROCESSORS["tile_resample"].threshold_a.default == 1.0
    assert P.PREPROCESSORS["blur_gaussian"].threshold_a.default == 9.0
    assert set(P.PREPROCESSORS["canny"].thresholds) == {"threshold_a", "threshold_b"}
    assert P.PREPROCESSORS["invert"].thresholds == {}
    weighted = {n for n, p in P.PREPROCESSORS.items() if p.needs_weights}
    assert weighted == {"depth_midas", "openpose", "lineart_realistic"}


@pytest.mark.parametrize("name", ["depth_midas", "openpose", "lineart_realistic", "depth", "lineart"])
def test_weighted_detectors_point_to_annotators_and_module_none(name):
    with pytest.raises(ParameterError, match="lllyasviel/Annotators") as err:
        P.preprocess(name, _square())
    assert "does not ship" in str(err.value) and "'none'" in str(err.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ParameterError, match="unknown preprocessor 'sobel'.*canny.*shuffle"):
        P.preprocess("sobel", _square())


def test_extension_labels_are_aliases():
    image = _square()
    by_label = P.preprocess("lineart_standard (from white bg & black line)", image, resolution=64)
    assert np.array_equal(np.array(by_label), np.array(P.preprocess("lineart_standard", image, resolution=64)))
    assert P.get_preprocessor("invert (from white bg & black line)").name == "invert"


@pytest.mark.parametrize("image, match", [
    (np.zeros((8, 8, 3), np.uint8), "image must be a PIL.Image.Image, got ndarray"),
    (Image.new("RGB", (0, 5)), "image is 0x5; both sides must be at least 1 pixel"),
])
def test_bad_images(image, match):
    with pytest.raises(ParameterError, match=match):
        P.preprocess("canny", image)
    with pytest.raises(ParameterError, match=match):
        P.resize_control_image(image, 64, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(resolution=63), r"resolution must be an integer in 64\.\.2048, got 63"),
    (dict(resolution=2049), r"resolution must be an integer in 64\.\.2048"),
    (dict(resolution=True), r"resolution must be an integer"),
    (dict(threshold_a=0), r"threshold_a \(Low Threshold\) of canny must be a number in 1\.\.255, got 0"),
    (dict(threshold_b=256), r"threshold_b \(High Threshold\) of canny must be a number in 1\.\.255"),
    (dict(threshold_a=float("nan")), r"threshold_a"),
    (dict(seed=-1), r"seed must be an integer in 0\.\.4294967295"),
])
def test_bad_parameters_name_the_field_and_range(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        P.preprocess("canny", _square(), **kwargs)


@pytest.mark.parametrize("name, value, match", [
    ("scribble_xdog", 65, r"1\.\.64"), ("tile_resample", 8.5, r"1\.0\.\.8\.0"), ("blur_gaussian", 0, r"0\.01\.\.64\.0"),
])
def test_slider_ranges_follow_the_extension(name, value, match):
    with pytest.raises(ParameterError, match=match):
        P.preprocess(name, _square(), threshold_a=value)


def test_threshold_for_a_hidden_slider_is_ignored():
    image = _square()
    assert np.array_equal(np.array(P.preprocess("invert", image, threshold_a=-1)),
                          np.array(P.preprocess("invert", image)))


def test_extreme_aspect_ratio_is_refused_before_allocating():
    with pytest.raises(ParameterError, match="long side would be 12800 pixels, more than 8192"):
        P.preprocess("canny", Image.new("RGB", (200, 1)), resolution=64)


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'sdlab\[control\]'"):
        P.preprocess("canny", _square())


# ---------------------------------------------------------------- detectors


def test_none_returns_the_rgb_picture_with_alpha_over_white():
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.putpixel((3, 4), (0, 0, 255, 255))
    out = np.array(P.preprocess("none", rgba, resolution=512))
    assert out.shape == (10, 20, 3)  # "none" does not rescale
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[4, 3]) == (0, 0, 255)


def test_canny_finds_the_square_border_and_nothing_in_flat_areas():
    out = np.array(P.preprocess("canny", _square(), resolution=64))  # 64x64 in: no rescale
    assert out.shape == (64, 64, 3) and set(np.unique(out)) <= {0, 255}
    edges = out[:, :, 0] > 0
    ring = np.zeros_like(edges)
    ring[14:50, 14:50] = True
    ring[19:45, 19:45] = False  # within 2 px of the square's border at 16 and 47
    assert edges.any() and not (edges & ~ring).any()
    for side in (edges[14:19, 20:44], edges[45:50, 20:44], edges[20:44, 14:19], edges[20:44, 45:50]):
        assert side.any(axis=0 if side.shape[1] > side.shape[0] else 1).all()  # each side traced end to end
    assert np.array_equal(out, np.array(P.preprocess("canny", _square(), resolution=64,
                                                     threshold_a=100, threshold_b=200)))  # defaults


def test_canny_output_follows_resolution_on_the_short_side():
    image = Image.new("RGB", (96, 64), "white")
    assert P.preprocess("canny", image, resolution=128).size == (192, 128)


def test_invert_is_255_minus_x_at_the_input_size():
    image = _noisy()
    out = P.preprocess("invert", image, resolution=256)
    assert out.size == image.size and np.array_equal(np.array(out), 255 - np.array(image))


def _line_drawing():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).line((8, 32, 56, 32), fill="black", width=2)  # rows 31..32 (PIL centres width 2)
    return image


def test_scribble_xdog_marks_the_dark_line_only():
    out = np.array(P.preprocess("scribble_xdog", _line_drawing(), resolution=64))[:, :, 0]
    assert set(np.unique(out)) <= {0, 255}
    assert out[30:34, 16:48].max(axis=0).min() == 255  # the line is traced along its length
    assert out[:20].max() == 0 and out[44:].max() == 0  # flat paper stays black


def test_lineart_standard_brightens_lines_on_black():
    out = np.array(P.preprocess("lineart_standard", _line_drawing(), resolution=64))[:, :, 0]
    assert out[30:34, 16:48].max(axis=0).min() >= 100
    assert out[:20].max() == 0 and out[44:].max() == 0


def test_tile_resample_downsamples_by_the_factor():
    image = _noisy(w=60, h=45)
    assert P.preprocess("tile_resample", image, resolution=512).size == (60, 45)  # default 1.0: unchanged
    assert np.array_equal(np.array(P.preprocess("tile_resample", image, threshold_a=1.05)), np.array(image))
    assert P.preprocess("tile_resample", image, threshold_a=2.5).size == (24, 18)  # int(60/2.5), int(45/2.5)


def test_blur_gaussian_lowers_variance_at_the_resolution():
    image = _noisy(w=96, h=64)
    out = np.array(P.preprocess("blur_gaussian", image, resolution=64, threshold_a=2.0), dtype=np.float64)
    assert out.shape == (64, 96, 3)
    assert out.var() < 0.2 * np.array(image, dtype=np.float64).var()
    assert abs(out.mean() - np.array(image).mean()) < 5  # a blur keeps the mean


def _gradient(w=80, h=64):
    """R encodes the column and G the row, so a remapped pixel says where it came from."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=2).round().astype(np.uint8))


def test_shuffle_is_deterministic_per_seed_and_rearranges_the_picture():
    image = _gradient()
    first = np.array(P.preprocess("shuffle", image, resolution=64, seed=7))
    assert first.shape == (64, 80, 3)
    assert np.array_equal(first, np.array(P.preprocess("shuffle", image, resolution=64, seed=7)))
    assert not np.array_equal(first, np.array(P.preprocess("shuffle", image, resolution=64, seed=8)))
    assert np.abs(first.astype(int) - np.array(image)).mean() > 20  # moved, not copied
    r, g = first[:, :, 0].astype(int), first[:, :, 1].astype(int)
    assert r.min() <= 3 and r.max() >= 252 and g.min() <= 3 and g.max() >= 252  # sources span the picture
    assert (first[:, :, 2] == 128).all()  # only positions move; colours come from the input
    assert np.abs(np.diff(r, axis=1)).max() < 40  # a smooth flow, not pixel noise


# ---------------------------------------------------------------- resizing


def test_resize_mode_name_accepts_names_ints_and_aliases():
    assert [P.resize_mode_name(i) for i in (0, 1, 2, 3)] == [*P.RESIZE_MODES, "Just Resize"]
    assert P.resize_mode_name("Inner Fit (Scale to Fit)") == "Crop and Resize"
    assert P.resize_mode_name("Envelope (Outer Fit)") == "Resize and Fill"
    for bad in ("crop", 4, -1, True, None):
        with pytest.raises(ParameterError, match="resize_mode .* not valid; use one of 'Just Resize'"):
            P.resize_mode_name(bad)


def test_just_resize_matches_diffusers_lanczos():
    from diffusers.image_processor import VaeImageProcessor

    image = _noisy(w=50, h=37, seed=3)
    ours = np.array(P.resize_control_image(image, 64, 48, "Just Resize"))
    tensor = VaeImageProcessor(do_normalize=False, do_convert_rgb=True).preprocess(image, height=48, width=64)
    theirs = (tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(ours, theirs)


def _wide_marked():
    """200x100: green centre square, red strip at the left end, blue strip at the right end."""
    image = Image.new("RGB", (200, 100), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 19, 99), fill="red")
    draw.rectangle((180, 0, 199, 99), fill="blue")
    draw.rectangle((90, 40, 109, 59), fill=(0, 255, 0))
    return image


def test_crop_and_resize_covers_and_keeps_the_centre():
    out = np.array(P.resize_control_image(_wide_marked(), 64, 64, "Crop and Resize")).astype(int)
    assert out.shape == (64, 64, 3)
    assert tuple(out[32, 32]) == (0, 255, 0)  # centre kept at the scale 64/100
    assert (out[:, :, 2] - out[:, :, 0] < 100).all() and (out[:, :, 0] - out[:, :, 1] < 100).all()  # ends cut


def test_resize_and_fill_keeps_the_whole_image_on_the_border_median():
    image = _wide_marked()
    out = np.array(P.resize_control_image(image, 64, 64, "Resize and Fill")).astype(int)
    assert out.shape == (64, 64, 3)
    # scale 64/200 -> 64x32 pasted at row 16; the bands above and below take the per-channel median of the
    # 600 border pixels (140 red, 140 blue, 320 white), which is white here
    borders = np.concatenate([np.array(image)[0], np.array(image)[-1], np.array(image)[:, 0], np.array(image)[:, -1]])
    assert tuple(out[0, 0]) == tuple(np.median(borders, axis=0).astype(np.uint8))
    assert (out[:15] == out[0, 0]).all() and (out[49:] == out[0, 0]).all()
    assert out[32, 1, 0] > 200 and out[32, 1, 2] < 60  # left red strip present
    assert out[32, 62, 2] > 200 and out[32, 62, 0] < 60  # right blue strip present
    assert tuple(out[32, 32]) == (0, 255, 0)


def test_resize_control_image_validates_size():
    with pytest.raises(ParameterError, match=r"width must be an integer in 1\.\.8192, got 0"):
        P.resize_control_image(_square(), 0, 64)


@pytest.mark.parametrize("w, h, tw, th, mode, expected", [
    (1000, 500, 512, 512, "Crop and Resize", 512),  # max(512/500, 512/1000) * 500
    (1000, 500, 512, 512, "Resize and Fill", 256),  # min(...) * 500
    (1000, 500, 512, 512, "Just Resize", 512),  # anything but fill takes the max
    (600, 400, 768, 512, 1, 512),  # same aspect: 1.28 * 400
    (300, 400, 512, 768, "Crop and Resize", 576),  # 1.92 * 300
    (300, 400, 512, 768, "Resize and Fill", 512),  # (512/300) * 300
    (640, 480, 512, 512, "Envelope (Outer Fit)", 384),  # 0.8 * 480
])
def test_pixel_perfect_resolution(w, h, tw, th, mode, expected):
    assert P.pixel_perfect_resolution(Image.new("RGB", (w, h)), tw, th, mode) == expected


# ---------------------------------------------------------------- inpaint hint


def test_inpaint_hint_matches_make_inpaint_condition():
    image = _noisy(w=24, h=16, seed=5)
    mask = Image.fromarray(np.random.RandomState(6).randint(0, 256, (16, 24), dtype=np.uint8))
    # diffusers' docs (ControlNet inpaint): make_inpaint_condition
    ref = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    ref[np.array(mask.convert("L")).astype(np.float32) / 255.0 > 0.5] = -1.0
    ref = torch.from_numpy(np.expand_dims(ref, 0).transpose(0, 3, 1, 2))
    hint = P.inpaint_hint(image, mask)
    assert hint.shape == (1, 3, 16, 24) and hint.dtype == torch.float32
    assert torch.equal(hint, ref) and (hint == -1).any() and (hint >= 0).any()


def test_inpaint_hint_needs_matching_sizes():
    with pytest.raises(ParameterError, match="mask is 8x8 but image is 24x16"):
        P.inpaint_hint(_noisy(w=24, h=16), Image.new("L", (8, 8)))
