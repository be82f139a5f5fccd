"""Generation parameters in a PNG, the way AUTOMATIC1111's web UI writes them ("infotext").

A PNG `tEXt`/`iTXt` chunk named `parameters` holds three parts:

    a red circle above a blue square                        <- the prompt (may span lines)
    Negative prompt: blurry                                 <- optional, may span lines
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: ...

The last line is `key: value` pairs joined by ", "; a value holding a comma, colon, quote or newline is
written as a JSON string. Other tools (A1111, ComfyUI readers, civitai) read this chunk, and
`params_from_infotext` reads it back, so `sdlab generate --from-png` re-creates an image.

Image i of a batch is written with its own seed (`seed + i`) and batch size 1 in the parameters that
matter for re-creation, so each image can be re-made alone. SDXL's micro-conditions, where a request sets
them, have keys of sdlab's own (A1111 writes none): "Original size: 2048x2048", "Crop top-left: "0,64"",
"Target size", their "Negative ..." forms, "Aesthetic score" (see `SIZE_CONDITIONS`); so do SDXL's second
prompts, where set: "Prompt 2", "Negative prompt 2" (see `SECOND_PROMPTS`; values quoted as JSON strings
when they hold a comma, colon, quote or newline, like every value).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

from .errors import ParameterError
from .images import PIL_READ_ERRORS, unreadable_reason
from .params import DEFAULT_REFINER_SWITCH, GenerationParams

PARAMETERS_KEY = "parameters"
VERSION = "sdlab 0.1.0"

# sdlab schedule names <-> A1111 "Schedule type" labels.
SCHEDULE_LABELS = {
    "automatic": "Automatic", "normal": "Normal", "karras": "Karras", "exponential": "Exponential",
    "uniform": "Uniform", "sgm_uniform": "SGM Uniform", "simple": "Simple",
}  # fmt: skip
_SCHEDULE_BY_LABEL = {label.lower(): key for key, label in SCHEDULE_LABELS.items()}

# The pieces of one `key: value` pair of the last line (see `_pairs`); a value is a JSON string or runs to
# the next comma. Each is matched once at a known position, so none of them can backtrack over the line.
_SPACES = re.compile(r"\s*")
_KEY = re.compile(r"\w[\w \-/+]*")
_QUOTED_VALUE = re.compile(r'("(?:\\.|[^\\"])*")(?:,|$)')
_PLAIN_VALUE = re.compile(r"([^,]*)(?:,|$)")
_NEGATIVE = "Negative prompt:"

# The longest infotext read back. A1111's are a few KB (long prompts, LoRA hashes); a PNG's text chunk can
# hold megabytes, which no prompt needs.
MAX_INFOTEXT_CHARS = 64 * 1024


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata says about the model: its name (as typed for `--model`) and short hash."""

    name: str
    hash: str | None = None


@dataclass
class InfoText:
    """A parsed infotext: prompt, negative prompt and the `key: value` pairs of the last line (as text)."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def to_params(self) -> GenerationParams:
        return params_from_fields(self.prompt, self.negative_prompt, self.fields)


# ---- writing ----


def infotext(params: GenerationParams, model: ModelInfo | None = None, *, index: int = 0,
             refiner: ModelInfo | None = None) -> str:
    """The A1111 text for image `index` of a generation with resolved `params` (size and seed set), and
    the refiner that finished it, if one did."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"{_NEGATIVE} {params.negative_prompt}")
    fields = _fields(params, model, index)
    if refiner is not None:  # A1111 writes "Refiner: name [hash], Refiner switch at: 0.8"
        fields["Refiner"] = f"{refiner.name} [{refiner.hash}]" if refiner.hash else refiner.name
        fields["Refiner switch at"] = _number(DEFAULT_REFINER_SWITCH if params.refiner_switch_at is None
                                              else params.refiner_switch_at)
        fields["Version"] = fields.pop("Version")  # last, as A1111 writes it
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _fields(params: GenerationParams, model: ModelInfo | None, index: int) -> dict[str, object]:
    fields: dict[str, object] = {"Steps": params.steps, "Sampler": params.sampler}
    # Schedule and CFG scale are None (the model's defaults) only in params never resolved against a model.
    if params.schedule is not None:
        fields["Schedule type"] = SCHEDULE_LABELS.get(params.schedule.lower(), params.schedule)
    if params.cfg_scale is not None:
        fields["CFG scale"] = _number(params.cfg_scale)
    fields |= {
        "Seed": (params.seed or 0) + index,
        "Size": f"{params.width}x{params.height}",
    }
    if model is not None and model.hash:
        fields["Model hash"] = model.hash
    if model is not None:
        fields["Model"] = model.name
    if params.batch_size > 1:
        fields["Batch size"], fields["Batch pos"] = params.batch_size, index
    if params.mode != "txt2img":
        fields["Denoising strength"] = _number(params.strength)
    if params.clip_skip != 1:
        fields["Clip skip"] = params.clip_skip
    if params.eta is not None:
        fields["Eta"] = _number(params.eta)
    if params.guidance_rescale:
        fields["Guidance rescale"] = _number(params.guidance_rescale)
    if params.token_merging:
        fields["Token merging ratio"] = _number(params.token_merging)
    if params.deepcache != 1:
        fields["DeepCache"] = params.deepcache
    fields |= _condition_fields(params)
    fields |= {key: text for name, key in SECOND_PROMPTS.items() if (text := getattr(params, name)) is not None}
    fields["Version"] = VERSION
    return fields


# SDXL's micro-conditions (GenerationParams field -> infotext key), written only when set (None and the
# defaults leave them out: the image's own size, crop (0, 0), aesthetic scores 6 / 2.5). A1111's infotext has
# no keys for them (it always conditions on the image's size), so these are sdlab's own, in its style:
# sizes as "WxH" like "Size", a crop as "TOP,LEFT" in the field's order (quoted, as values with commas are).
SIZE_CONDITIONS = {"original_size": "Original size", "target_size": "Target size",
                   "negative_original_size": "Negative original size", "negative_target_size": "Negative target size"}
CROP_CONDITIONS = {"crops_coords_top_left": "Crop top-left", "negative_crops_coords_top_left": "Negative crop top-left"}
SCORE_CONDITIONS = {"aesthetic_score": "Aesthetic score", "negative_aesthetic_score": "Negative aesthetic score"}
# The second text encoder's prompts (GenerationParams field -> infotext key), written only when set (None:
# the first prompts). A1111 has one prompt; these keys are sdlab's own.
SECOND_PROMPTS = {"prompt_2": "Prompt 2", "negative_prompt_2": "Negative prompt 2"}


def _condition_fields(params: GenerationParams) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name, key in SIZE_CONDITIONS.items():
        if (value := getattr(params, name)) is not None:
            height, width = value
            fields[key] = f"{width}x{height}"
    for name, key in CROP_CONDITIONS.items():
        value = getattr(params, name)
        if value is not None and tuple(value) != GenerationParams.crops_coords_top_left:
            fields[key] = format_crop(value)
    for name, key in SCORE_CONDITIONS.items():
        if getattr(params, name) != getattr(GenerationParams, name):
            fields[key] = _number(getattr(params, name))
    return fields


def format_crop(value: tuple[int, int]) -> str:
    """(top, left) -> "TOP,LEFT"."""
    return f"{value[0]},{value[1]}"


def _number(x: float) -> int | float:
    """7.0 -> 7 (as A1111 writes it), 7.5 -> 7.5."""
    return int(x) if float(x).is_integer() else x


def _quote(value: object) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def png_info(text: str) -> PngImagePlugin.PngInfo:
    """A PngInfo carrying `text` as the `parameters` chunk (iTXt, so any Unicode prompt survives)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, text)
    return info


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    """The image encoded as PNG, with `text` as its parameters chunk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(text) if text is not None else None)
    return buffer.getvalue()


# ---- reading ----


def read_infotext(image: Image.Image | str | os.PathLike | bytes, *, name: str | None = None) -> str | None:
    """The `parameters` text of a PNG (a PIL image, a path or the file's bytes), or None if it has none.

    A path or bytes that cannot be read as an image (missing, not an image, truncated, a text chunk that
    inflates past PIL's limit, a decompression bomb) is a one-line ParameterError naming `name` (default:
    the path, or "the PNG data"); only the chunks before the pixel data are read, never the pixels.
    """
    if isinstance(image, Image.Image):
        return image.info.get(PARAMETERS_KEY)
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    name = name or ("the PNG data" if isinstance(image, bytes) else str(image))
    try:
        with Image.open(source) as opened:
            text = opened.info.get(PARAMETERS_KEY)
    except PIL_READ_ERRORS as e:
        raise ParameterError(f"{name}: {unreadable_reason(e)}") from None
    return text if isinstance(text, str) else None


def parse_infotext(text: str) -> InfoText:
    """Split an infotext into prompt, negative prompt and the last line's fields (in time linear in its
    length); ParameterError if it is longer than MAX_INFOTEXT_CHARS."""
    if len(text) > MAX_INFOTEXT_CHARS:
        raise ParameterError(f"the PNG parameters text is {len(text)} characters long, more than the "
                             f"{MAX_INFOTEXT_CHARS} an infotext may have (A1111's are a few thousand)")
    lines = text.strip("\n").split("\n")
    fields: dict[str, str] = {}
    pairs = _pairs(lines[-1])
    if len(pairs) >= 3:  # a prompt line rarely has three `key: value` pairs
        fields = {k.strip(): _unquote(v.strip()) for k, v in pairs}
        lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].lstrip()
        (negative if in_negative else prompt).append(line)
    return InfoText("\n".join(prompt), "\n".join(negative), fields)


def _pairs(line: str) -> list[tuple[str, str]]:
    """The (key, value as written) pairs of a parameters line: what `re.findall` of
    `\\s*(\\w[\\w \\-/+]*):\\s*("(?:\\\\.|[^\\\\"])*"|[^,]*)(?:,|$)` finds, without its quadratic time.

    findall retries that pattern at every position, and each try scans a whole run of key characters
    before failing for want of a colon: a long line without one took seconds. A try from inside a run
    fails where the run ends, so the scan resumes there instead; every character is then looked at a
    bounded number of times.
    """
    pairs, pos = [], 0
    while pos < len(line):
        start = _SPACES.match(line, pos).end()
        key = _KEY.match(line, start)
        if key is None:  # no key starts here, nor anywhere in the spaces before
            pos = start + 1
        elif not line.startswith(":", key.end()):  # no key starting inside this run has a colon either
            pos = key.end()
        else:
            value_start = _SPACES.match(line, key.end() + 1).end()
            value = _QUOTED_VALUE.match(line, value_start) or _PLAIN_VALUE.match(line, value_start)
            pairs.append((key[0], value[1]))
            pos = value.end()
    return pairs


def params_from_infotext(text: str) -> GenerationParams:
    """The GenerationParams an infotext describes (batch size 1: the one image it belongs to)."""
    return parse_infotext(text).to_params()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def params_from_fields(prompt: str, negative: str, fields: dict[str, str]) -> GenerationParams:
    """Map A1111 field names onto GenerationParams; unknown fields are ignored."""
    changes: dict[str, object] = {"prompt": prompt, "negative_prompt": negative}
    changes |= {name: fields[key] for name, key in SECOND_PROMPTS.items() if key in fields}
    try:
        _read_sampling(fields, changes)
        _read_numbers(fields, changes)
    except ValueError as e:
        raise ParameterError(f"PNG parameters: cannot read {e}") from None
    return GenerationParams(**changes)


def _read_sampling(fields: dict[str, str], changes: dict[str, object]) -> None:
    if "Sampler" in fields or "Schedule type" in fields:
        # No "Schedule type" means A1111's default at the time: "Automatic".
        sampler, schedule = split_sampler(fields.get("Sampler") or GenerationParams.sampler,
                                          fields.get("Schedule type"), default_schedule="automatic")
        changes["sampler"], changes["schedule"] = sampler, schedule


def split_sampler(sampler: str, schedule: str | None, default_schedule: str) -> tuple[str, str]:
    """(sampler, sdlab schedule name) from an A1111 sampler name and optional schedule label. A1111 before
    1.9 folded the schedule into the sampler name ("DPM++ 2M Karras"); that form is understood too."""
    if schedule is None:
        for label in SCHEDULE_LABELS.values():
            if sampler.endswith(" " + label):
                sampler, schedule = sampler[: -len(label) - 1], label
                break
    return sampler, schedule_name(schedule) if schedule else default_schedule


def schedule_name(label: str) -> str:
    """An A1111 "Schedule type" label or an sdlab name -> the sdlab name ("SGM Uniform" -> "sgm_uniform")."""
    return _SCHEDULE_BY_LABEL.get(label.strip().lower(), label.strip().lower().replace(" ", "_"))


_NUMBERS = {  # A1111 field -> (GenerationParams field, type)
    "Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float), "Eta": ("eta", float),
    "Guidance rescale": ("guidance_rescale", float), "DeepCache": ("deepcache", int),
    "Token merging ratio": ("token_merging", float), "Refiner switch at": ("refiner_switch_at", float),
    **{key: (name, float) for name, key in SCORE_CONDITIONS.items()},
}  # fmt: skip


def _read_numbers(fields: dict[str, str], changes: dict[str, object]) -> None:
    for label, (name, kind) in _NUMBERS.items():
        if label in fields:
            try:
                changes[name] = kind(fields[label])
            except ValueError:
                raise ValueError(f"{label} (not {'an integer' if kind is int else 'a number'})") from None
    if "Size" in fields:
        try:
            changes["width"], changes["height"] = parse_size(fields["Size"])
        except ParameterError:
            raise ValueError("Size (not WIDTHxHEIGHT)") from None
    for name, key in SIZE_CONDITIONS.items():
        if key in fields:
            try:
                width, height = parse_size(fields[key])
            except ParameterError:
                raise ValueError(f"{key} (not WIDTHxHEIGHT)") from None
            changes[name] = (height, width)  # GenerationParams keeps diffusers' (height, width)
    for name, key in CROP_CONDITIONS.items():
        if key in fields:
            try:
                changes[name] = parse_crop(fields[key])
            except ParameterError:
                raise ValueError(f"{key} (not TOP,LEFT)") from None


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ParameterError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(match[1]), int(match[2])


def parse_crop(text: str) -> tuple[int, int]:
    """'0,64' -> (0, 64): a crop's top-left corner (top, left) in pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not match:
        raise ParameterError(f"crop {text!r} is not TOP,LEFT in pixels, e.g. 0,0")
    return int(match[1]), int(match[2])
