"""sdlab.tokenizer.CLIPTokenizer against transformers.CLIPTokenizer built from the same vocabulary files."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import sdlab

from sdlab.errors import TokenizerError
from sdlab.tokenizer import CLIPTokenizer

DATA = Path(sdlab.__file__).parent / "data" / "clip"

REFERENCE_PROMPT = "a fantasy landscape with mountains and a river"
REFERENCE_IDS = [49406, 320, 5267, 5727, 593, 5873, 537, 320, 2473, 49407]

HAND_PICKED = [
    "",
    " ",
    REFERENCE_PROMPT,
    "A Photo of an ASTRONAUT riding a Horse, HDR, 8k, trending on ArtStation!!!",
    "masterpiece, best quality, (detailed:1.2), [blurry], ((sharp focus))",
    "1girl, 2boys, 1234567890, 3.14159, -42, 1e10, 0x1F",
    "café crème brûlée, naïve façade, Ångström, São Paulo, Zürich",
    "東京の夜景, 北京烤鸭, 한국어 문장, Русский текст, ελληνικά, עברית, العربية",
    "emoji 😀🎉🚀 👩‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "too    many     spaces",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "   leading and trailing   ",
    "MiXeD CaSe WoRdS",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    "it's the cat's toy, we'll see, they're here, I've been, I'm fine, he'd go, don't",
    "IT'S LOUD, WE'LL SHOUT",
    "symbols: @#$%^&*()_+-=[]{}|;':\",./<>?`~ \\ ...",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "combining: e\u0301 vs \u00e9, A\u030a vs \u00c5",
    "x <|endoftext|> y <|startoftext|> z",
    "x<|ENDOFTEXT|>y",
    "x<|StartOfText|>y<|startoftext|>",
    "hello! wow!! what?! ok!",
    "a " * 100,
    ", ".join(["beautiful detailed intricate landscape painting"] * 20),
]

WORDS = ["cat", "dog", "astronaut", "cyberpunk", "city", "neon", "lights", "painting", "by", "greg", "rutkowski",
         "octane", "render", "4k", "8K", "ultra", "realistic", "portrait", "of", "a", "the", "woman", "Misty",
         "forest", "sunset", "über", "niño", "東京", "猫", "😀", "🌸", "isn't", "we'll", "&amp;", "rock'n'roll",
         "x-men", "sci-fi", "e-mail", "2024", "1.5", "v2", "ABC", "mIxEd"]
SYMBOLS = [",", ".", "!", "?", "(", ")", "[", "]", ":", ";", "-", "_", "/", "\\", "'", '"', "&", "#", "@", "%",
           "*", "+", "=", "<", ">", "|", "~", "^", "{", "}", "…", "—", "·"]
SEPARATORS = [" ", " ", " ", "  ", "", "\t", "\n", ", "]


def random_prompts(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(0, 60)):
            pieces.append(rng.choice(WORDS) if rng.random() < 0.7 else rng.choice(SYMBOLS))
            pieces.append(rng.choice(SEPARATORS))
        prompts.append("".join(pieces))
    return prompts


CORPUS = HAND_PICKED + random_prompts(300)


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def saved_folder(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    ours.save(folder)
    return folder


@pytest.fixture(scope="module")
def reference(saved_folder):
    return transformers.CLIPTokenizer.from_pretrained(saved_folder)


def reference_batch(reference, texts, max_length=77):
    encoded = reference(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded.input_ids


def test_reference_ids_of_the_shipped_vocabulary(ours):
    assert ours.encode(REFERENCE_PROMPT) == REFERENCE_IDS[1:-1]
    row = ours(REFERENCE_PROMPT)
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, :10].tolist() == REFERENCE_IDS
    assert row[0, 10:].eq(49407).all()


def test_attributes(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.max_length) == (49406, 49407, 49407, 77)
    assert ours.vocab_size == 49408
    assert ours.comma_token_id == 267


def test_saved_folder_loads_in_transformers_with_same_special_tokens(reference):
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (49406, 49407, 49407)
    assert len(reference) == 49408


@pytest.mark.parametrize("text", HAND_PICKED, ids=range(len(HAND_PICKED)))
def test_encode_matches_transformers_on_edge_cases(ours, reference, text):
    assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids


def test_encode_matches_transformers_on_random_prompts(ours, reference):
    prompts = random_prompts(300)
    expected = reference(prompts, add_special_tokens=False).input_ids
    got = ours.encode_batch(prompts)
    mismatches = [p for p, g, e in zip(prompts, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"
    assert any(len(ids) > 75 for ids in got), "the corpus should include over-long prompts"


def test_padded_batch_matches_transformers(ours, reference):
    assert torch.equal(ours(CORPUS), reference_batch(reference, CORPUS))


def test_truncation_keeps_end_token_last(ours, reference):
    long_prompt = ", ".join(f"word{i}" for i in range(100))
    assert len(ours.encode(long_prompt)) > 200
    ids = ours(long_prompt)[0]
    assert ids.shape == (77,)
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1].tolist() == ours.encode(long_prompt)[:75]
    assert torch.equal(ours(long_prompt), reference_batch(reference, [long_prompt]))


def test_other_max_length_matches_transformers(ours, reference):
    texts = CORPUS[:40]
    assert torch.equal(ours(texts, max_length=16), reference_batch(reference, texts, max_length=16))


def test_no_truncation_pads_to_the_longest_row(ours):
    short, long_prompt = "a cat", "cat " * 100
    ids = ours([short, long_prompt], truncate=False)
    assert ids.shape == (2, 102)
    assert ids[1].tolist() == [49406] + ours.encode(long_prompt) + [49407]
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and ids[0, 4:].eq(49407).all()
    assert ours([short], truncate=False).shape == (1, 77)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours, reference, skip_special_tokens):
    for ids in ours(CORPUS[:60]):
        expected = reference.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected


def test_decode_round_trips_normalized_text(ours):
    assert ours.decode(ours(REFERENCE_PROMPT)[0]) == REFERENCE_PROMPT
    assert ours.decode(ours.encode("Hello,   WORLD")) == "hello , world"


# ------------------------------------------------------------------------ folder layouts, SD 2.x padding

FLAGS = {"lstrip": False, "rstrip": False, "single_word": False}


def token(content, normalized=True):
    return {"content": content, "normalized": normalized, **FLAGS}


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# (special_tokens_map.json, tokenizer_config.json) as found in real model folders, and two synthetic variants.
LAYOUTS = {
    "sd15_hub": ({"bos_token": token(BOS), "eos_token": token(EOS), "unk_token": token(EOS), "pad_token": EOS},
                 {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": EOS,
                  "bos_token": token(BOS), "eos_token": token(EOS), "unk_token": token(EOS)}),
    "sd2_hub": ({"bos_token": token(BOS), "eos_token": token(EOS), "unk_token": token(EOS), "pad_token": "!"},
                {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": EOS,
                 "bos_token": token(BOS), "eos_token": token(EOS), "unk_token": token(EOS)}),
    "bare": (None, None),
    "added_tokens_decoder": ({"pad_token": "!"},  # ignored by transformers when the config has the decoder
                             {"tokenizer_class": "CLIPTokenizer", "pad_token": EOS, "bos_token": BOS,
                              "added_tokens_decoder": {"49406": {**token(BOS, False), "special": True},
                                                       "49407": {**token(EOS, True), "special": True}}}),
}
LAYOUT_TEXTS = CORPUS[:60] + ["hello!", "wow!! what?!", "! ! !", "x<|ENDOFTEXT|>y", "x <|StartOfText|> y"]


def make_folder(parent, name, special_map, config):
    folder = parent / name
    folder.mkdir()
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / file, folder / file)
    for file, content in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
        if content is not None:
            (folder / file).write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("layouts"), "sd2", *LAYOUTS["sd2_hub"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folder_layouts_match_transformers(tmp_path, layout):
    folder = make_folder(tmp_path, layout, *LAYOUTS[layout])
    ours, reference = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == reference.pad_token_id
    assert torch.equal(ours(LAYOUT_TEXTS), reference_batch(reference, LAYOUT_TEXTS))


def test_default_equals_the_hub_folders(tmp_path):
    sd15 = CLIPTokenizer.from_folder(make_folder(tmp_path, "sd15", *LAYOUTS["sd15_hub"]))
    sd2 = CLIPTokenizer.from_folder(make_folder(tmp_path, "sd2", *LAYOUTS["sd2_hub"]))
    assert torch.equal(CLIPTokenizer.default()(LAYOUT_TEXTS), sd15(LAYOUT_TEXTS))
    assert torch.equal(CLIPTokenizer.default(pad_token_id=0)(LAYOUT_TEXTS), sd2(LAYOUT_TEXTS))


def test_sd2_folder_pads_with_exclamation_mark(sd2_folder):
    ours = CLIPTokenizer.from_folder(sd2_folder)
    reference = transformers.CLIPTokenizer.from_pretrained(sd2_folder)
    assert ours.pad_token_id == reference.pad_token_id == 0
    ids = ours(REFERENCE_PROMPT)[0]
    assert ids[:10].tolist() == REFERENCE_IDS and ids[10:].eq(0).all()
    # transformers registers "!" as a special token, so "hello!!" becomes [..., 0, 0]; we match it.
    texts = CORPUS[:80] + ["hello!", "wow!! what?!", "! ! !"]
    assert torch.equal(ours(texts), reference_batch(reference, texts))


def test_default_with_sd2_pad_id_equals_sd2_folder(sd2_folder):
    texts = ["hello!!", REFERENCE_PROMPT, "x" * 200]
    assert torch.equal(CLIPTokenizer.default(pad_token_id=0)(texts), CLIPTokenizer.from_folder(sd2_folder)(texts))


def test_sd2_save_round_trips_through_transformers(sd2_folder, tmp_path):
    original = CLIPTokenizer.from_folder(sd2_folder)
    original.save(tmp_path)
    reloaded, reference = CLIPTokenizer.from_folder(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_token_id == reference.pad_token_id == 0
    expected = original(LAYOUT_TEXTS)
    assert torch.equal(reloaded(LAYOUT_TEXTS), expected)
    assert torch.equal(reference_batch(reference, LAYOUT_TEXTS), expected)


def test_default_rejects_unknown_pad_id():
    with pytest.raises(TokenizerError, match="pad_token_id=99999"):
        CLIPTokenizer.default(pad_token_id=99999)


# ---------------------------------------------------------------------------------------- bad folders


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_folder_missing_a_file(saved_folder, tmp_path, missing):
    for name in ("vocab.json", "merges.txt"):
        if name != missing:
            shutil.copy(saved_folder / name, tmp_path / name)
    with pytest.raises(TokenizerError) as info:
        CLIPTokenizer.from_folder(tmp_path)
    assert missing in str(info.value) and str(tmp_path) in str(info.value)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize(
    "vocab_text, message",
    [
        ("{not json", "not valid UTF-8 JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('{"a": "one"}', "non-negative integers"),
        ('{"a": 0, "b": 0}', "share one id"),
        ('{"a": 0, "b": 1}', "<|startoftext|>"),
    ],
)
def test_malformed_vocab(saved_folder, tmp_path, vocab_text, message):
    shutil.copy(saved_folder / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text(vocab_text)
    with pytest.raises(TokenizerError, match=message) as info:
        CLIPTokenizer.from_folder(tmp_path)
    assert "vocab.json" in str(info.value)


def test_malformed_merges(saved_folder, tmp_path):
    shutil.copy(saved_folder / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthis line has three\n")
    with pytest.raises(TokenizerError, match="line 3"):
        CLIPTokenizer.from_folder(tmp_path)


def test_pad_token_missing_from_vocab(saved_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(saved_folder / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerError, match="'<pad>'"):
        CLIPTokenizer.from_folder(tmp_path)


def test_merges_that_do_not_fit_the_vocab(saved_folder, tmp_path):
    shutil.copy(saved_folder / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nqqq zzz\n")
    with pytest.raises(TokenizerError, match="do not fit"):
        CLIPTokenizer.from_folder(tmp_path)
