"""The shapes world: a procedural dataset of coloured shapes with captions, and an evaluator that checks
whether an image shows what its prompt asks for. It lets sdlab train and test a small latent diffusion
model entirely offline ("a red circle above a blue square").

    scene = sample_scene(np.random.default_rng(0))      # ground truth
    image, text = render(scene), caption(scene, rng)     # training pair
    score(parse_prompt("a red circle above a blue square"), image)  # {"colour": True, ..., "all": ...}
"""

from sdlab.shapes.captions import PromptError, caption, parse_prompt
from sdlab.shapes.dataset import ShapesDataset, ShapesMix
from sdlab.shapes.evaluate import (
    ATTRIBUTES, Analysis, Detection, EvalReport, EvalTable, analyze, contact_sheet, eval_prompts, evaluate,
    run_eval, score, score_analysis,
)
from sdlab.shapes.render import render
from sdlab.shapes.world import (
    BACKGROUNDS, HELDOUT_PAIRS, POSITIONS, RELATIONS, SHAPE_COLOURS, SHAPES, SIZES, ObjectSpec, Scene,
    SceneSpec, ShapeObject, sample_scene,
)

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "HELDOUT_PAIRS", "POSITIONS", "RELATIONS", "SHAPES", "SHAPE_COLOURS", "SIZES",
    "Analysis", "Detection", "EvalReport", "EvalTable", "ObjectSpec", "PromptError", "Scene", "SceneSpec",
    "ShapeObject", "ShapesDataset", "ShapesMix", "analyze", "caption", "contact_sheet", "eval_prompts", "evaluate",
    "parse_prompt", "render", "run_eval", "sample_scene", "score", "score_analysis",
]
