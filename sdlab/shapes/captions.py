"""The caption grammar of the shapes world, both ways: scene -> varied captions, and prompt -> `SceneSpec`.

Grammar (after synonyms are folded, e.g. "grey" -> "gray", "big" -> "large", "over" -> "above"):

    caption    := [prefix] [count ":"] body [background]    | [background ","] body
    body       := object REL object                           (two objects, no positions)
                | object ("," object)* ["," | ""] ["and" object]
    object     := ["a" | "the"] [size] colour shape [position]
    position   := ("in" | "at" | "on" | "near") ["the"] cell ["corner" | "side"]
    background := ["on" | "against" | "with"] ["a" | "the"] bgcolour "background"
    REL        := "above" | "below" | ["to" "the"] "left" "of" | ["to" "the"] "right" "of"

Since the grammar is ours, the parser is exact: every generated caption parses back to a spec that the
scene satisfies, and anything else raises `PromptError` naming the words it could not place.
"""

from __future__ import annotations

import re

import numpy as np

from sdlab.errors import ParameterError
from sdlab.shapes.world import (
    BACKGROUNDS, PALETTE, POSITIONS, RELATIONS, SHAPE_COLOURS, SHAPES, SIZES, ObjectSpec, Scene, SceneSpec,
    ShapeObject, true_relations,
)


class PromptError(ParameterError):
    """A prompt lies outside the shapes-world caption grammar."""


# ---- surface words: canonical value -> the words captions may use for it ----

COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in PALETTE} | {
    "purple": ("purple", "violet"), "gray": ("gray", "grey"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",), "star": ("star",),
    "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "above": ("above", "over"), "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
}
PREFIXES = ("a picture of", "an image of", "a drawing of", "a photo of")
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
BACKGROUND_TEMPLATES = ("on a {} background", "against a {} background", "with a {} background")


def _position_phrases(position: str) -> tuple[str, ...]:
    """Ways to say where a shape is, e.g. "top left" -> "in the upper left corner"."""
    column, row = POSITIONS[position]
    if position == "center":
        return ("in the center", "in the middle", "in the centre", "at the center")
    if column == 1:  # top or bottom edge
        return (f"at the {position}", f"near the {position}", f"in the {position} middle")
    if row == 1:  # left or right edge
        return (f"on the {position}", f"on the {position} side", f"at the {position}")
    vertical, horizontal = position.split()
    synonym = {"top": "upper", "bottom": "lower"}[vertical]
    return tuple(
        template.format(v, horizontal)
        for v in (vertical, synonym)
        for template in ("in the {} {} corner", "at the {} {}", "in the {} {}")
    )


# ---- scene -> caption ----

def caption(scene: Scene, rng: np.random.Generator, mode: str = "auto", relation_share: float = 0.5) -> str:
    """A random natural caption of `scene`, true of it. mode "relation" (two objects only) relates the two
    shapes ("a red circle above a blue square"), "list" names each shape, "auto" relates the two shapes of a
    two-object scene with probability `relation_share` and lists them otherwise."""
    n = len(scene.objects)
    if mode not in ("auto", "list", "relation"):
        raise ParameterError(f"caption: mode={mode!r} must be 'auto', 'list' or 'relation'")
    if mode == "relation" and n != 2:
        raise ParameterError(f"caption: mode='relation' needs a 2-object scene, this one has {n}")
    use_relation = mode == "relation" or (mode == "auto" and n == 2 and rng.random() < relation_share)
    body = _relation_body(scene, rng) if use_relation else _list_body(scene, rng)
    return _frame(body, scene, rng)


def _frame(body: str, scene: Scene, rng: np.random.Generator) -> str:
    """Wrap the body in an optional count header, prefix and background phrase."""
    n = len(scene.objects)
    if n > 1 and rng.random() < 0.3:
        body = f"{COUNT_WORDS[n]}: {body}"
    elif rng.random() < 0.15:
        body = f"{_pick(rng, PREFIXES)} {body}"
    if rng.random() < 0.5:
        background = _pick(rng, COLOUR_WORDS[scene.background])
        if rng.random() < 0.2 and not body.startswith(PREFIXES):
            return f"{background} background, {body}"
        body = f"{body} {_pick(rng, BACKGROUND_TEMPLATES).format(background)}"
    return body


def _list_body(scene: Scene, rng: np.random.Generator) -> str:
    """ "a red circle on the left, a blue star and a small yellow square at the bottom". """
    with_positions = len(scene.objects) == 1 or rng.random() < 0.7
    order = rng.permutation(len(scene.objects))
    phrases = [_object_phrase(scene.objects[i], rng, with_positions) for i in order]
    if len(phrases) == 1:
        return phrases[0]
    last_joiner = _pick(rng, (" and ", ", and ", ", ")) if len(phrases) == 3 else " and "
    return ", ".join(phrases[:-1]) + last_joiner + phrases[-1]


def _relation_body(scene: Scene, rng: np.random.Generator) -> str:
    """ "a red circle above a blue square": a relation true of the scene, in either object order. """
    first, second = (scene.objects[i] for i in rng.permutation(2))
    relation = _pick(rng, true_relations(first, second))
    words = _pick(rng, RELATION_WORDS[relation])
    return f"{_object_phrase(first, rng, False)} {words} {_object_phrase(second, rng, False)}"


def _object_phrase(obj: ShapeObject, rng: np.random.Generator, with_position: bool) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    words += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    if with_position and (rng.random() < 0.7):
        words.append(_pick(rng, _position_phrases(obj.position)))
    article = _pick(rng, ("a", "a", "the", ""))
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join(([article] if article else []) + words)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ---- prompt -> spec ----

def _fold_table() -> dict[tuple[str, ...], str]:
    """Surface word sequences -> one canonical token ("plus sign" -> "cross", "to the left of" -> "left_of")."""
    table: dict[tuple[str, ...], str] = {}
    for words_of, canonical_of in (
        (COLOUR_WORDS, lambda c: c), (SHAPE_WORDS, lambda s: s), (SIZE_WORDS, lambda s: s),
        (RELATION_WORDS, lambda r: r.replace(" ", "_")),
    ):
        for value, words in words_of.items():
            for phrase in words:
                table[tuple(phrase.split())] = canonical_of(value)
    table |= {("upper",): "top", ("lower",): "bottom", ("middle",): "center", ("centre",): "center",
              ("an",): "a"}
    for phrase in PREFIXES:
        table[tuple(phrase.split())] = "PREFIX"
    for n, phrase in COUNT_WORDS.items():
        table[tuple(phrase.split())] = f"COUNT{n}"
    return table


_FOLD = _fold_table()
_FOLD_LENGTHS = sorted({len(k) for k in _FOLD}, reverse=True)
_RELATION_TOKENS = {r.replace(" ", "_"): r for r in RELATIONS}
_POSITION_TOKENS = {tuple(p.split()): p for p in POSITIONS} | {
    ("top", "center"): "top", ("bottom", "center"): "bottom",
}
_PREPOSITIONS = ("in", "at", "on", "near")
_GRAMMAR_HINT = (
    "prompts must follow the shapes-world grammar, e.g. 'a red circle above a blue square' or "
    "'a small green star in the top left corner on a white background'; colours: "
    f"{', '.join(SHAPE_COLOURS)}; shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)}; positions: "
    f"{', '.join(POSITIONS)}; relations: {', '.join(RELATIONS)}; backgrounds: {', '.join(BACKGROUNDS)}"
)


def parse_prompt(text: str) -> SceneSpec:
    """The scene a prompt asks for. Unstated attributes are None (any value will do)."""
    tokens = _tokenize(text)
    try:
        tokens, background = _take_background(tokens)
        tokens, count = _take_header(tokens)
        objects, relation = _parse_body(tokens)
    except PromptError as error:
        raise PromptError(f"cannot parse prompt {text!r}: {error}; {_GRAMMAR_HINT}") from None
    if count is not None and count != len(objects):
        raise PromptError(f"cannot parse prompt {text!r}: it announces {count} shapes but describes "
                          f"{len(objects)}")
    return SceneSpec(objects=tuple(objects), relation=relation, background=background)


def _tokenize(text: str) -> list[str]:
    """Lower-cased words and commas, with synonyms and multi-word phrases folded to canonical tokens."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"cannot parse prompt {text!r}: it is empty; {_GRAMMAR_HINT}")
    if not re.fullmatch(r"[a-z\s,:.]+", text.lower()):
        raise PromptError(f"cannot parse prompt {text!r}: only letters, spaces, commas, colons and full "
                          f"stops may appear; {_GRAMMAR_HINT}")
    raw = re.findall(r"[a-z]+|,|:", text.lower())
    folded, i = [], 0
    while i < len(raw):
        for length in _FOLD_LENGTHS:
            if tuple(raw[i:i + length]) in _FOLD:
                folded.append(_FOLD[tuple(raw[i:i + length])])
                i += length
                break
        else:
            folded.append(raw[i])
            i += 1
    return folded


def _take_background(tokens: list[str]) -> tuple[list[str], str | None]:
    """Remove "[on|against|with] [a|the] <colour> background[,]" wherever it is; return its colour."""
    if "background" not in tokens:
        return tokens, None
    at = tokens.index("background")
    if tokens.count("background") > 1 or at == 0 or tokens[at - 1] not in BACKGROUNDS:
        raise PromptError(f"a background must be one of {', '.join(BACKGROUNDS)}, said once")
    start, end = at - 1, at + 1
    if start > 0 and tokens[start - 1] in ("a", "the"):
        start -= 1
    if start > 0 and tokens[start - 1] in ("on", "against", "with"):
        start -= 1
    if end < len(tokens) and tokens[end] == ",":
        end += 1
    return tokens[:start] + tokens[end:], tokens[at - 1]


def _take_header(tokens: list[str]) -> tuple[list[str], int | None]:
    """Remove a leading "a picture of" or "two shapes:"; return the announced count, if any."""
    if tokens[:1] == ["PREFIX"]:
        return tokens[1:], None
    if tokens and tokens[0].startswith("COUNT"):
        rest = tokens[2:] if tokens[1:2] == [":"] else tokens[1:]
        return rest, int(tokens[0][len("COUNT"):])
    return tokens, None


def _parse_body(tokens: list[str]) -> tuple[list[ObjectSpec], str | None]:
    relations = [i for i, t in enumerate(tokens) if t in _RELATION_TOKENS]
    if len(relations) > 1:
        raise PromptError("at most one relation (above, below, left of, right of) is allowed")
    if relations:
        at = relations[0]
        objects = [_parse_object(tokens[:at]), _parse_object(tokens[at + 1:])]
        return objects, _RELATION_TOKENS[tokens[at]]
    objects = [_parse_object(part) for part in _split_list(tokens)]
    if not 1 <= len(objects) <= 3:
        raise PromptError(f"a prompt describes 1 to 3 shapes, not {len(objects)}")
    return objects, None


def _split_list(tokens: list[str]) -> list[list[str]]:
    """Split "A, B, and C" at commas and "and" (empty pieces from ", and" are dropped)."""
    parts, current = [], []
    for token in tokens:
        if token in (",", "and"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    if not parts[-1] or not parts[0]:
        raise PromptError("a list of shapes may not start or end with ',' or 'and'")
    return [p for p in parts if p]


def _parse_object(tokens: list[str]) -> ObjectSpec:
    """ "[a|the] [size] colour shape [position]" -> ObjectSpec."""
    words = list(tokens)
    if words[:1] in (["a"], ["the"]):
        words = words[1:]
    size = words.pop(0) if words[:1] and words[0] in SIZES else None
    if len(words) < 2 or words[0] not in SHAPE_COLOURS or words[1] not in SHAPES:
        phrase = " ".join(tokens) or "nothing"
        raise PromptError(f"expected '[a|the] [size] <colour> <shape>' but found {phrase!r}")
    return ObjectSpec(colour=words[0], shape=words[1], size=size, position=_parse_position(words[2:]))


def _parse_position(words: list[str]) -> str | None:
    """ "in the top left corner" -> "top left"; [] -> None."""
    if not words:
        return None
    phrase = " ".join(words)
    if words[0] not in _PREPOSITIONS:
        raise PromptError(f"unexpected words {phrase!r} after a shape; a position starts with "
                          f"{', '.join(_PREPOSITIONS)}")
    words = words[1:]
    if words[:1] == ["the"]:
        words = words[1:]
    if words[-1:] in (["corner"], ["side"]):
        words = words[:-1]
    position = _POSITION_TOKENS.get(tuple(words))
    if position is None:
        raise PromptError(f"unknown position {phrase!r}; positions are {', '.join(POSITIONS)}")
    return position
