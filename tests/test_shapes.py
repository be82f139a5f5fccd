"""The shapes world: scene sampling, rendering, the caption grammar both ways, and the dataset."""

import itertools

import numpy as np
import pytest

from sdlab.errors import ParameterError
from sdlab.shapes import (
    BACKGROUNDS, HELDOUT_PAIRS, POSITIONS, SHAPE_COLOURS, SHAPES, SIZES, ObjectSpec, PromptError, SceneSpec,
    ShapesDataset, ShapesMix, caption, parse_prompt, render, sample_scene,
)
from sdlab.shapes.world import GAP, PALETTE, colours_allowed_on, srgb_to_lab, true_relations


def scenes(n, split="train", seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, **kwargs) for _ in range(n)]


# ---- world ----

def test_sampling_is_deterministic_given_the_seed():
    assert scenes(20, seed=3) == scenes(20, seed=3)
    assert scenes(20, seed=3) != scenes(20, seed=4)


def test_palette_colours_are_distinguishable():
    shape_lab = srgb_to_lab(np.array([PALETTE[c] for c in SHAPE_COLOURS]))
    distances = np.linalg.norm(shape_lab[:, None] - shape_lab[None], axis=-1)
    assert distances[~np.eye(len(SHAPE_COLOURS), dtype=bool)].min() >= 35  # CIELAB units
    assert len(SHAPE_COLOURS) >= 8 and len(SHAPES) >= 5


def test_heldout_pairs_use_each_colour_and_shape_at_most_once():
    colours, shapes = zip(*HELDOUT_PAIRS)
    assert 4 <= len(HELDOUT_PAIRS) <= 6
    assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
    assert set(colours) <= set(SHAPE_COLOURS) and set(shapes) <= set(SHAPES)
    assert ("red", "circle") not in HELDOUT_PAIRS and ("blue", "square") not in HELDOUT_PAIRS


def test_train_split_never_contains_a_heldout_pair_and_heldout_always_does():
    for scene in scenes(1500, "train"):
        assert not {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS
    for scene in scenes(300, "heldout"):
        assert {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS


def test_train_split_covers_the_whole_vocabulary():
    sample = scenes(1500, "train")
    objects = [o for s in sample for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(SHAPE_COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in sample} == set(BACKGROUNDS)
    assert {len(s.objects) for s in sample} == {1, 2, 3}
    seen_pairs = {(o.colour, o.shape) for o in objects}
    assert seen_pairs == set(itertools.product(SHAPE_COLOURS, SHAPES)) - HELDOUT_PAIRS


def test_scenes_are_valid_layouts():
    for scene in scenes(1500, "any"):
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours)  # one object per colour: segmentation is unambiguous
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert o.colour in colours_allowed_on(scene.background) and o.colour != scene.background
            assert o.radius == SIZES[o.size]
            assert all(o.radius < c < 1 - o.radius for c in o.centre)  # box inside the image
            column, row = POSITIONS[o.position]
            assert (min(int(o.centre[0] * 3), 2), min(int(o.centre[1] * 3), 2)) == (column, row)
        for a, b in itertools.combinations(scene.objects, 2):
            needed = a.radius + b.radius + GAP - 1e-9
            assert abs(a.centre[0] - b.centre[0]) >= needed or abs(a.centre[1] - b.centre[1]) >= needed


def test_n_objects_and_bad_arguments():
    assert {len(s.objects) for s in scenes(30, n_objects=2)} == {2}
    with pytest.raises(ParameterError, match="split"):
        sample_scene(np.random.default_rng(0), "validation")
    with pytest.raises(ParameterError, match="n_objects"):
        sample_scene(np.random.default_rng(0), n_objects=4)


# ---- render ----

@pytest.mark.parametrize("size", [64, 128])
def test_render_draws_background_and_each_shape_in_its_colour(size):
    for scene in scenes(40, "any", seed=size):
        image = np.asarray(render(scene, size))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == PALETTE[scene.background]
        for o in scene.objects:
            # The middle of every outline is filled (the triangle's too: it is half as wide there).
            x, y = (int(c * size) for c in o.centre)
            assert tuple(image[y, x]) == PALETTE[o.colour], (o, scene.background)


def test_render_rejects_tiny_images():
    with pytest.raises(ParameterError, match="size"):
        render(scenes(1)[0], 16)


# ---- captions ----

def assert_spec_true_of(spec: SceneSpec, scene):
    assert len(spec.objects) == len(scene.objects)
    remaining = list(scene.objects)
    matched = []
    for want in spec.objects:  # colours are unique within a scene: they identify objects
        got = next(o for o in remaining if o.colour == want.colour)
        remaining.remove(got)
        matched.append(got)
        assert want.shape == got.shape
        assert want.size in (None, got.size)
        assert want.position in (None, got.position)
    assert spec.background in (None, scene.background)
    if spec.relation is not None:
        assert spec.relation in true_relations(*matched)


def test_every_generated_caption_parses_back_to_a_spec_true_of_its_scene():
    rng = np.random.default_rng(7)
    texts = set()
    for scene in scenes(2000, "any", seed=1):
        text = caption(scene, rng)
        texts.add(text)
        assert_spec_true_of(parse_prompt(text), scene)
    assert len(texts) > 1900  # varied, not a handful of templates


def test_captions_are_varied_in_form():
    rng = np.random.default_rng(0)
    texts = [caption(s, rng) for s in scenes(500, "train")]
    for fragment in ("background", " above ", " left of ", "two shapes:", "three shapes:", "corner", "the ",
                     "small ", "big ", "grey", " and "):
        assert any(fragment in t for t in texts), fragment


def test_relation_mode_relates_two_objects():
    rng = np.random.default_rng(0)
    for scene in scenes(200, n_objects=2):
        spec = parse_prompt(caption(scene, rng, mode="relation"))
        assert spec.relation is not None and all(o.position is None for o in spec.objects)
    with pytest.raises(ParameterError, match="2-object"):
        caption(scenes(1, n_objects=1)[0], rng, mode="relation")


def test_parse_the_mission_prompt():
    assert parse_prompt("a red circle above a blue square") == SceneSpec(
        objects=(ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), relation="above"
    )


def test_parse_synonyms_positions_and_background():
    spec = parse_prompt("Three shapes: a big violet disc in the upper left corner, the tiny black plus sign "
                        "on the right side, and an orange rhombus in the middle against a grey background.")
    assert spec == SceneSpec(
        objects=(ObjectSpec("purple", "circle", "large", "top left"), ObjectSpec("black", "cross", "small", "right"),
                 ObjectSpec("orange", "diamond", None, "center")),
        background="gray",
    )
    assert parse_prompt("beige background, a white star to the right of the little red square") == SceneSpec(
        objects=(ObjectSpec("white", "star"), ObjectSpec("red", "square", "small")), relation="right of",
        background="beige",
    )


@pytest.mark.parametrize("prompt, complaint", [
    ("", "empty"),
    ("a dog on a skateboard", "colour"),
    ("a circle", "colour"),  # the grammar always names the colour
    ("a red circle in the sky", "position"),
    ("a gray circle", "colour"),  # gray is a background colour only
    ("a red circle above a blue square below a green star", "one relation"),
    ("two shapes: a red circle", "announces 2"),
    ("a red circle, a blue square, a green star and a white cross", "1 to 3"),
    ("a red circle on a purple background", "background"),
    ("a red circle!", "letters"),
])
def test_parse_rejects_prompts_outside_the_grammar(prompt, complaint):
    with pytest.raises(PromptError, match=complaint) as error:
        parse_prompt(prompt)
    assert isinstance(error.value, ParameterError)
    if prompt:
        assert "grammar" in str(error.value) or "announces" in str(error.value)


# ---- dataset ----

def test_dataset_is_a_pure_function_of_seed_and_index():
    data = ShapesDataset(seed=5, length=50)
    image, text = data[17]
    again_image, again_text = ShapesDataset(seed=5, length=50)[17]
    assert text == again_text and np.array_equal(image, again_image)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(np.asarray(render(data.scene(17))), image)
    assert_spec_true_of(parse_prompt(text), data.scene(17))
    other_image, other_text = ShapesDataset(seed=6, length=50)[17]
    assert other_text != text or not np.array_equal(other_image, image)


def test_dataset_iterates_shards_and_validates():
    data = ShapesDataset(seed=0, length=12, size=128)
    items = list(data)
    assert len(items) == 12 and items[0][0].shape == (128, 128, 3)
    assert len({t for _, t in items}) == 12
    for _, text in items:
        spec = parse_prompt(text)
        assert not {(o.colour, o.shape) for o in spec.objects} & HELDOUT_PAIRS
    with pytest.raises(IndexError):
        data[12]
    with pytest.raises(ParameterError, match="split"):
        ShapesDataset(split="test")


def test_the_default_mix_is_the_worlds_own_stream():
    # The recipe's UNet stage trains on the default mix: adding the mix must not have changed its data.
    data = ShapesDataset(seed=3, length=300)
    explicit = ShapesDataset(seed=3, length=300, mix=ShapesMix((4, 4, 2), 0.5))  # weights are relative
    for i in range(0, 300, 7):
        rng = data._rng(i)
        scene = sample_scene(rng, "train")
        assert data.scene(i) == explicit.scene(i) == scene
        assert data[i][1] == explicit[i][1] == caption(scene, rng)


def test_a_mix_sets_how_many_shapes_and_how_often_they_are_related():
    only_relations = ShapesDataset(seed=0, length=100, mix=ShapesMix((0, 1, 0), relation_share=1.0))
    for i in range(100):
        assert len(only_relations.scene(i).objects) == 2 and parse_prompt(only_relations[i][1]).relation

    data = ShapesDataset(seed=0, length=1500, mix=ShapesMix((0.3, 0.55, 0.15), relation_share=0.75))
    counts, related = np.zeros(4), 0
    for i in range(len(data)):
        n = len(data.scene(i).objects)
        counts[n] += 1
        related += n == 2 and parse_prompt(data[i][1]).relation is not None
    np.testing.assert_allclose(counts[1:] / len(data), (0.3, 0.55, 0.15), atol=0.04)
    assert abs(related / counts[2] - 0.75) < 0.05


@pytest.mark.parametrize("weights, share, complaint", [
    ((1, 1), 0.5, "object_weights"), ((1, -1, 1), 0.5, "object_weights"), ((0, 0, 0), 0.5, "object_weights"),
    ((1, 1, float("nan")), 0.5, "object_weights"), ((1, "2", 1), 0.5, "object_weights"),
    ((1, 1, 1), 1.5, "relation_share"), ((1, 1, 1), "0.5", "relation_share"),
])
def test_a_bad_mix_is_refused(weights, share, complaint):
    with pytest.raises(ParameterError, match=complaint):
        ShapesMix(weights, share)
