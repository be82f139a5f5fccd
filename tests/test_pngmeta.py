"""A1111 `parameters` chunk: writing from GenerationParams, parsing back, and reading A1111's own text."""

import io
import random
import re
import struct
import time
import zlib

import pytest
from PIL import Image, PngImagePlugin

from sdlab.errors import ParameterError
from sdlab.params import GenerationParams
from sdlab.pngmeta import (
    MAX_INFOTEXT_CHARS,
    ModelInfo,
    infotext,
    params_from_infotext,
    parse_infotext,
    png_bytes,
    read_infotext,
    split_sampler,
)

MODEL = ModelInfo("v1-5-pruned-emaonly", "6ce0161689")


def test_infotext_has_a1111_layout():
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=20, sampler="Euler a",
                              schedule="karras", cfg_scale=7.0, seed=42, width=512, height=768)
    text = infotext(params, MODEL)
    assert text.split("\n") == [
        "a red circle",
        "Negative prompt: blurry",
        ("Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: sdlab 0.1.0"),
    ]


def test_round_trip_keeps_every_generation_field():
    params = GenerationParams(prompt="a blue star,\nbelow a square: big", negative_prompt="ugly\nnoisy",
                              steps=7, sampler="DPM++ SDE", schedule="sgm_uniform", cfg_scale=4.5,
                              guidance_rescale=0.7, seed=2**40 + 3, width=64, height=128, clip_skip=2, eta=0.3,
                              token_merging=0.4, deepcache=3)
    back = params_from_infotext(infotext(params, MODEL))
    assert back == params


def test_batch_image_carries_its_own_seed():
    params = GenerationParams(prompt="p", seed=10, batch_size=4, width=64, height=64)
    text = infotext(params, MODEL, index=3)
    fields = parse_infotext(text).fields
    assert fields["Seed"] == "13" and fields["Batch size"] == "4" and fields["Batch pos"] == "3"
    assert params_from_infotext(text).batch_size == 1  # re-creating it alone


def test_values_with_commas_and_colons_are_quoted():
    model = ModelInfo("random:tiny", "abc")
    text = infotext(GenerationParams(prompt="x", seed=1, width=8, height=8), model)
    assert 'Model: "random:tiny"' in text
    assert parse_infotext(text).fields["Model"] == "random:tiny"


def test_img2img_records_denoising_strength():
    init = Image.new("RGB", (64, 64))
    params = GenerationParams(prompt="x", seed=1, width=64, height=64, init_image=init, strength=0.4)
    fields = parse_infotext(infotext(params, MODEL)).fields
    assert fields["Denoising strength"] == "0.4"


def test_reads_text_written_by_a1111():
    # As AUTOMATIC1111 v1.6 writes it: schedule folded into the sampler name, extra fields we ignore.
    text = ("masterpiece, a castle\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x640, "
            'Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.5, Lora hashes: "a: 1, b: 2", '
            "Version: v1.6.0")
    info = parse_infotext(text)
    assert info.prompt == "masterpiece, a castle" and info.negative_prompt == "lowres, bad anatomy"
    assert info.fields["Lora hashes"] == "a: 1, b: 2"
    params = info.to_params()
    assert (params.sampler, params.schedule, params.steps, params.cfg_scale) == ("DPM++ 2M", "karras", 28, 6.5)
    assert (params.seed, params.width, params.height, params.strength) == (1234, 512, 640, 0.5)


def test_a_prompt_without_parameters_line():
    info = parse_infotext("just a prompt, with a comma")
    assert info.prompt == "just a prompt, with a comma" and info.fields == {}


def test_missing_schedule_type_means_automatic():
    text = "p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    assert params_from_infotext(text).schedule == "automatic"


def test_split_sampler():
    assert split_sampler("DPM++ 2M SDE Exponential", None, "karras") == ("DPM++ 2M SDE", "exponential")
    assert split_sampler("Euler", "SGM Uniform", "karras") == ("Euler", "sgm_uniform")
    assert split_sampler("Euler", None, "karras") == ("Euler", "karras")


def test_bad_numbers_raise_parameter_error():
    with pytest.raises(ParameterError, match="Steps"):
        params_from_infotext("p\nSteps: many, Sampler: Euler, Seed: 1, Size: 64x64")
    with pytest.raises(ParameterError, match="Size"):
        params_from_infotext("p\nSteps: 3, Sampler: Euler, Seed: 1, Size: big")


def test_png_chunk_round_trip_with_unicode():
    text = infotext(GenerationParams(prompt="ein Kreis über einem Quadrat ✓", seed=1, width=8, height=8), MODEL)
    data = png_bytes(Image.new("RGB", (8, 8), "red"), text)
    assert read_infotext(data) == text
    assert read_infotext(Image.open(io.BytesIO(data))) == text
    assert read_infotext(png_bytes(Image.new("RGB", (8, 8)))) is None


# ---- bad input: linear-time parsing, a size limit, unreadable files ----

# The pattern the parser used to run with re.findall, kept as the reference for what `_pairs` must find.
FINDALL_PAIR = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def test_pairs_find_what_the_old_pattern_found():
    from sdlab.pngmeta import _pairs

    alphabet = list('aZ_1é -/+:,"\\\t.\u00a0\r\n') + ["Steps", ": ", ", ", '\\"']
    rng = random.Random(0)
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert _pairs(line) == FINDALL_PAIR.findall(line), repr(line)


@pytest.mark.parametrize("line", [
    "a" * 60_000,                        # one key run with no colon: each findall retry rescanned it
    "a " * 30_000,
    " \t" * 30_000,
    'k: "x,' * 10_000,                   # quoted values that never close
    "Steps: 1, " + "b-c/d+e " * 7_000,
], ids=["word", "words", "spaces", "unclosed-quotes", "key-characters"])  # fmt: skip
def test_long_adversarial_lines_parse_in_linear_time(line):
    started = time.perf_counter()
    parse_infotext("a prompt\n" + line)
    assert time.perf_counter() - started < 0.5  # the old parser took ~20 s on the first


def test_an_infotext_over_the_limit_is_refused_at_once():
    started = time.perf_counter()
    with pytest.raises(ParameterError, match=f"more than the {MAX_INFOTEXT_CHARS}"):
        parse_infotext("a" * (1 << 20))
    assert time.perf_counter() - started < 0.1
    parse_infotext("p" * (MAX_INFOTEXT_CHARS - 60) + "\nSteps: 1, Sampler: Euler, Seed: 1")  # at the limit: read


def test_bad_fields_are_named_without_quoting_them():
    with pytest.raises(ParameterError, match="Steps") as error:
        params_from_infotext("p\nSteps: SECRET, Sampler: Euler, Seed: 1, Size: 64x64")
    assert "SECRET" not in str(error.value)


def _png_with_chunk(chunk_type: bytes, data: bytes) -> bytes:
    """A small PNG with one extra chunk right after IHDR (where text chunks are read at open)."""
    png = png_bytes(Image.new("RGB", (4, 4)))
    chunk = struct.pack(">I", len(data)) + chunk_type + data
    chunk += struct.pack(">I", zlib.crc32(chunk_type + data) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # 8 signature bytes + the 25-byte IHDR chunk


def unreadable_pngs(tmp_path):
    """(path, what the error must say) for files read_infotext cannot read."""
    inflating = zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), 9)
    files = {
        "ztxt_bomb.png": (_png_with_chunk(b"zTXt", b"parameters\0\0" + inflating), "inflates past PIL's limit"),
        "itxt_bomb.png": (_png_with_chunk(b"iTXt", b"parameters\0\1\0\0\0" + inflating), "inflates past"),
        "huge.png": (png_bytes(Image.new("RGB", (4, 4)))[:16]
                     + _ihdr(100_000, 100_000), "decompression bomb"),
        "text.png": (b"SECRET: not an image at all", "not an image file"),
        "truncated.png": (png_bytes(Image.new("RGB", (4, 4)), "p")[:20], "damaged or truncated"),
    }
    cases = []
    for name, (data, message) in files.items():
        (tmp_path / name).write_bytes(data)
        cases.append((tmp_path / name, message))
    return cases + [(tmp_path / "missing.png", "no such file"), (tmp_path, "is a folder")]


def _ihdr(width: int, height: int) -> bytes:
    """The rest of a PNG after its IHDR chunk's length and type: size, CRC, and an IEND."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF)
    return body + crc + iend


def test_unreadable_pngs_are_one_line_parameter_errors_naming_the_file(tmp_path):
    for path, message in unreadable_pngs(tmp_path):
        with pytest.raises(ParameterError, match=message) as error:
            read_infotext(path)
        text = str(error.value)
        assert text.startswith(f"{path}: ") and "\n" not in text and "SECRET" not in text
    data = (tmp_path / "ztxt_bomb.png").read_bytes()
    with pytest.raises(ParameterError, match="^the PNG data: a text chunk inflates"):
        read_infotext(data)
    with pytest.raises(ParameterError, match="^upload: a text chunk"):
        read_infotext(data, name="upload")
