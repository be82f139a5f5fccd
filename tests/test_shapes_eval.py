"""The shapes-world evaluator, validated on rendered ground truth: clean, degraded like a VAE round trip
would degrade it, and deliberately wrong."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlab.errors import ParameterError
from sdlab.shapes import (
    ATTRIBUTES, HELDOUT_PAIRS, SceneSpec, analyze, caption, contact_sheet, eval_prompts, evaluate,
    parse_prompt, render, run_eval, sample_scene, score,
)
from sdlab.shapes.evaluate import score_analysis
from sdlab.shapes.world import BACKGROUNDS, SHAPES, SIZES, colours_allowed_on


def ground_truth(n, seed=0, size=64, split="any", **kwargs):
    """(scene, caption, image) triples."""
    rng = np.random.default_rng(seed)
    triples = []
    for _ in range(n):
        scene = sample_scene(rng, split, **kwargs)
        triples.append((scene, caption(scene, rng), render(scene, size)))
    return triples


def blur_and_noise(image, rng, radius=1.0, sigma=6.0):
    """Roughly what a VAE round trip does: soft edges and a little noise."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(np.round(blurred + rng.normal(0, sigma, blurred.shape)), 0, 255).astype(np.uint8)


def jpeg(image, quality=80):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def accuracy(specs, images):
    """attribute -> fraction correct, plus the failing cases for messages."""
    results = [score(spec, image) for spec, image in zip(specs, images)]
    table = {a: np.mean([r[a] for r in results if a in r]) for a in ATTRIBUTES if any(a in r for r in results)}
    return table, [(s, r) for s, r in zip(specs, results) if not r["all"]]


def check(specs, images, at_least):
    table, failures = accuracy(specs, images)
    assert min(table.values()) >= at_least, (table, failures[:3])
    return table


# ---- ground truth ----

def test_ground_truth_scores_perfectly_against_captions_and_full_specs():
    triples = ground_truth(100, seed=11)
    results = []
    for scene, text, image in triples:
        analysis = analyze(image)
        results += [score_analysis(parse_prompt(text), analysis), score_analysis(scene.spec(), analysis)]
    failures = [r for r in results if not r["all"]]
    assert len(failures) <= 0.01 * len(results), failures[:3]
    assert {a for r in results for a in r} == set(ATTRIBUTES)  # captions state every attribute somewhere


def test_ground_truth_at_128_pixels():
    triples = ground_truth(25, seed=12, size=128)
    check([scene.spec() for scene, *_ in triples], [image for *_, image in triples], at_least=0.99)


def test_relations_are_checked_on_ground_truth():
    rng = np.random.default_rng(0)
    triples = ground_truth(60, seed=13, n_objects=2)
    specs = [parse_prompt(caption(scene, rng, mode="relation")) for scene, *_ in triples]
    assert all(spec.relation for spec in specs)
    check(specs, [image for *_, image in triples], at_least=0.99)


def test_robust_to_blur_and_noise():
    rng = np.random.default_rng(1)
    triples = ground_truth(100, seed=14)
    images = [blur_and_noise(image, rng) for *_, image in triples]
    check([scene.spec() for scene, *_ in triples], images, at_least=0.95)


def test_robust_to_jpeg():
    triples = ground_truth(60, seed=15)
    check([scene.spec() for scene, *_ in triples], [jpeg(image) for *_, image in triples], at_least=0.95)


def test_accepts_arrays_floats_and_channels_first():
    scene, _, image = ground_truth(1, seed=16)[0]
    array = np.asarray(image)
    spec = scene.spec()
    for variant in (array, array / 255.0, (array / 255.0).transpose(2, 0, 1).astype(np.float32)):
        assert score(spec, variant)["all"]
    with pytest.raises(ParameterError, match="RGB"):
        score(spec, array[..., 0])


# ---- wrong images must score wrong ----

def rerender(scene, **changes):
    return render(dataclasses.replace(scene, **changes))


def test_swapped_colours_fail_the_colour_check():
    triples = ground_truth(40, seed=20, split="train", n_objects=2)
    for scene, _, _ in triples:
        a, b = scene.objects
        swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
        result = score(scene.spec(), rerender(scene, objects=swapped))
        if a.shape != b.shape:  # same shapes with swapped colours is the same picture, rightly
            assert not result["colour"] and not result["all"], (scene, result)


def test_wrong_colour_shape_size_position_background_and_count_fail():
    for scene, _, _ in ground_truth(20, seed=21, split="train", n_objects=1):
        (obj,) = scene.objects
        spec = scene.spec()
        other_colour = next(c for c in colours_allowed_on(scene.background) if c != obj.colour)
        other_shape = next(s for s in SHAPES if s != obj.shape)
        other_size = {"small": "large", "large": "small"}[obj.size]
        other_backgrounds = [b for b in BACKGROUNDS if b != scene.background and obj.colour in colours_allowed_on(b)]
        mirrored = dataclasses.replace(obj, centre=(1 - obj.centre[0], 1 - obj.centre[1]))
        cases = {
            "colour": rerender(scene, objects=(dataclasses.replace(obj, colour=other_colour),)),
            "shape": rerender(scene, objects=(dataclasses.replace(obj, shape=other_shape),)),
            "size": rerender(scene, objects=(dataclasses.replace(obj, radius=SIZES[other_size]),)),
            "count": rerender(scene, objects=()),
        }
        if other_backgrounds:  # white shapes only ever stand on black
            cases["background"] = rerender(scene, background=other_backgrounds[0])
        if obj.position != "center":
            cases["position"] = rerender(scene, objects=(mirrored,))
        for attribute, image in cases.items():
            result = score(spec, image)
            assert not result[attribute] and not result["all"], (attribute, scene, result)


def test_flipped_relation_fails():
    rng = np.random.default_rng(3)
    for scene, _, image in ground_truth(30, seed=22, n_objects=2):
        spec = parse_prompt(caption(scene, rng, mode="relation"))
        flip = np.flipud if spec.relation in ("above", "below") else np.fliplr
        assert score(spec, image)["relation"]
        assert not score(spec, flip(np.asarray(image)).copy())["relation"], (spec, scene)


def test_extra_object_fails_count_only():
    scene, _, _ = ground_truth(1, seed=23, split="train", n_objects=2)[0]
    spec = SceneSpec(objects=scene.spec().objects[:1])
    result = score(spec, render(scene))
    assert not result["count"] and result["colour"] and result["shape"] and not result["all"]


# ---- many prompts ----

def test_analyze_reports_what_is_drawn():
    scene, _, image = ground_truth(1, seed=24, n_objects=3)[0]
    analysis = analyze(image)
    assert analysis.background == scene.background
    found = {(d.colour, d.shape, d.size, d.position) for d in analysis.objects}
    assert found == {(o.colour, o.shape, o.size, o.position) for o in scene.objects}


def test_evaluate_table_and_contact_sheet(tmp_path):
    triples = ground_truth(10, seed=25)
    prompts, images = [t for _, t, _ in triples], [i for *_, i in triples]
    images[0] = render(dataclasses.replace(triples[0][0], objects=()))  # one blank failure
    table = evaluate(prompts, images)
    correct, scored = table.accuracy()["all"]
    assert (correct, scored) == (9, 10)
    text = table.to_text()
    assert "count" in text and "90.0%" in text
    assert table.count_errors() == (1, 0)  # the blank image has too few objects, none has too many
    assert "count errors: 1 with too few objects, 0 with too many" in text
    path = contact_sheet(images, prompts, tmp_path / "sheet.png", columns=4)
    sheet = Image.open(path)
    assert sheet.width == 4 * (128 + 4) and sheet.height > 3 * 128
    with pytest.raises(ParameterError, match="one label per image"):
        contact_sheet(images, prompts[:3], tmp_path / "bad.png")
    with pytest.raises(ParameterError, match="prompts"):
        evaluate(prompts, images[:2])


def test_run_eval_generates_scores_and_writes_the_report(tmp_path):
    triples = ground_truth(6, seed=26)
    lookup = {text: image for _, text, image in triples}
    calls = []

    def generate(batch):
        calls.append(len(batch))
        return [lookup[p] for p in batch]

    report = run_eval(generate, list(lookup), tmp_path / "eval", batch_size=4)
    assert calls == [4, 2]
    assert report.table.accuracy()["all"] == (6, 6)
    assert (tmp_path / "eval" / "report.txt").read_text().startswith("attribute")
    assert report.contact_sheet.exists()
    with pytest.raises(ParameterError, match="grammar"):
        run_eval(generate, ["a photo of an astronaut"], tmp_path / "eval")


@pytest.mark.parametrize("kind", ["single", "relation", "heldout"])
def test_eval_prompts(kind):
    prompts = eval_prompts(seed=0, n=60, kind=kind)
    assert prompts == eval_prompts(seed=0, n=60, kind=kind) and len(set(prompts)) == 60
    assert prompts != eval_prompts(seed=1, n=60, kind=kind)
    specs = [parse_prompt(p) for p in prompts]
    pairs = [{(o.colour, o.shape) for o in s.objects} for s in specs]
    if kind == "single":
        assert all(len(s.objects) == 1 for s in specs) and not any(p & HELDOUT_PAIRS for p in pairs)
    if kind == "relation":
        assert all(s.relation for s in specs) and not any(p & HELDOUT_PAIRS for p in pairs)
    if kind == "heldout":
        assert all(p & HELDOUT_PAIRS for p in pairs)
    with pytest.raises(ParameterError, match="kind"):
        eval_prompts(kind="everything")


# ---- the full validation (run with -m slow) ----

@pytest.mark.slow
def test_validation_on_1000_scenes():
    triples = ground_truth(1000, seed=100)
    captions = [parse_prompt(text) for _, text, _ in triples]
    specs = [scene.spec() for scene, *_ in triples]
    clean = [image for *_, image in triples]
    check(captions, clean, at_least=0.99)
    check(specs, clean, at_least=0.99)
    rng = np.random.default_rng(101)
    check(specs, [blur_and_noise(image, rng) for image in clean], at_least=0.95)
    check(specs, [jpeg(image) for image in clean], at_least=0.95)
    sharp_128 = [render(scene, 128) for scene, *_ in triples[:300]]
    check(specs[:300], sharp_128, at_least=0.99)
    check(specs[:300], [blur_and_noise(image, rng) for image in sharp_128], at_least=0.95)
