"""sdlab.prompts: A1111 emphasis syntax, BREAK, 75-token chunking with comma backtrack, LoRA tags, and the
mean-restoring emphasis. Expected values are derived by hand from A1111's documented semantics (the
examples in `prompt_parser.parse_prompt_attention`'s docstring are reproduced exactly)."""

import logging
import random

import pytest
import torch

from sdlab.errors import ParameterError
from sdlab.prompts import (
    BREAK,
    Chunk,
    Span,
    apply_emphasis,
    empty_chunk,
    extract_lora_tags,
    parse_emphasis,
    stack_chunks,
    tokenize_weighted,
)
from sdlab.tokenizer import CLIPTokenizer

UP, DOWN = 1.1, 1 / 1.1
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def tok_sd2():
    return CLIPTokenizer.default(pad_token_id=0)


def assert_spans(got, expected):
    """Texts exactly, weights to float precision; BREAK markers where expected."""
    assert [s.text for s in got] == [text for text, _ in expected]
    assert [s.weight for s in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------- parse_emphasis


def test_a1111_docstring_examples_exactly():
    assert parse_emphasis("normal text") == [("normal text", 1.0)]
    assert parse_emphasis("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_emphasis("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_emphasis("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_emphasis("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    # the same float values A1111's docstring prints, so the factors are applied in the same order
    assert parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]


def test_spans_are_named_tuples():
    span = parse_emphasis("(x)")[0]
    assert isinstance(span, Span) and (span.text, span.weight) == ("x", 1.1)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("(word)", [("word", UP)]),
        ("((word))", [("word", UP * UP)]),
        ("(((word)))", [("word", UP**3)]),
        ("[word]", [("word", DOWN)]),
        ("[[word]]", [("word", DOWN * DOWN)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word: 1.5 )", [("word", 1.5)]),
        ("(word:.5)", [("word", 0.5)]),
        ("(word:0)", [("word", 0.0)]),
        ("(word:-1)", [("word", -1.0)]),
        ("(word:+2)", [("word", 2.0)]),
        ("((word:1.5))", [("word", 1.5 * UP)]),
        ("[(word:1.5)]", [("word", 1.5 * DOWN)]),
        ("([word])", [("word", DOWN * UP)]),
        ("a (b (c) d) e", [("a ", 1.0), ("b ", UP), ("c", UP * UP), (" d", UP), (" e", 1.0)]),
        ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
        ("(a)(b)", [("ab", UP)]),  # neighbours of equal weight merge
        ("(a:0.5)[b]", [("a", 0.5), ("b", DOWN)]),
    ],
)
def test_emphasis_weights(prompt, expected):
    assert_spans(parse_emphasis(prompt), expected)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("\\(a\\)", [("(a)", 1.0)]),
        ("\\[a\\]", [("[a]", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),  # \\ is one literal backslash
        ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped, as in A1111
        ("(a\\)b)", [("a)b", UP)]),
        ("(\\(x\\):1.3)", [("(x)", 1.3)]),
    ],
)
def test_escapes(prompt, expected):
    assert_spans(parse_emphasis(prompt), expected)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a) b]", [("a) b]", 1.0)]),  # closers with nothing open are text
        ("a (b", [("a ", 1.0), ("b", UP)]),  # an unclosed opener reaches to the end
        ("((a) b", [("a", UP * UP), (" b", UP)]),
        ("[a (b", [("a ", DOWN), ("b", UP * DOWN)]),
        ("(a]", [("a]", UP)]),
        ("[a)", [("a)", DOWN)]),
        # "(" and "[" are separate stacks: ")" closes the last "(" even across an open "["
        ("(a [b) c]", [("a ", UP), ("b", UP * DOWN), (" c", DOWN)]),
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # an explicit weight with no "(" open is text
        ("a:b", [("a:b", 1.0)]),
        ("(a: b)", [("a: b", UP)]),
        ("(a:1.2.3", [("a:1.2.3", UP)]),  # not followed by ")", so no weight
        ("[a:b:0.5]", [("a:b:0.5", DOWN)]),  # prompt editing is not supported: plain emphasis
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("(:1.4)", [("", 1.0)]),
    ],
)
def test_unbalanced_and_odd_syntax(prompt, expected):
    assert_spans(parse_emphasis(prompt), expected)


def test_non_numeric_weight_is_an_error():
    with pytest.raises(ParameterError, match="'1.2.3' in the prompt is not a number"):
        parse_emphasis("(a:1.2.3)")


def test_break_keyword():
    assert parse_emphasis("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_emphasis("a,\nBREAK\n, b") == [("a,", 1.0), BREAK, (", b", 1.0)]
    assert parse_emphasis("BREAK") == [("", 1.0), BREAK, ("", 1.0)]
    assert parse_emphasis("a BREAK BREAK b") == [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]
    assert BREAK == ("BREAK", -1.0)  # A1111's marker


@pytest.mark.parametrize("prompt", ["a break b", "aBREAK b", "BREAKING news", "a_BREAK"])
def test_break_must_be_an_upper_case_whole_word(prompt):
    assert BREAK not in parse_emphasis(prompt)


def test_break_inside_brackets_still_breaks():
    # deliberate difference from A1111, where the marker's weight becomes -1.1 and "BREAK" turns into text
    assert_spans(parse_emphasis("(a BREAK b)"), [("a", UP), ("BREAK", -1.0), ("b", UP)])
    assert parse_emphasis("(a BREAK b)")[1] is BREAK


# -------------------------------------------------------------------------------- tokenize_weighted


def plain_prompts(count=200, seed=7):
    rng = random.Random(seed)
    words = ["a", "photo", "of", "cat", "astronaut", "4k", "café", "東京", "😀", "it's", "&amp;", "!", "?", "-",
             ",", ".", "portrait", "Greg", "rutkowski", "DETAILED", "x1.5", "'", '"', "/", "#", "~"]
    return ["".join(rng.choice(words) + rng.choice([" ", ", ", "", "  "]) for _ in range(rng.randint(0, 30)))
            for _ in range(count)]


def test_plain_prompts_give_exactly_the_tokenizer_row(tok, tok_sd2):
    prompts = [p for p in plain_prompts() if len(tok.encode(p)) <= 75] + ["", "a " * 75]
    assert len(prompts) > 150
    for tokenizer in (tok, tok_sd2):
        rows = tokenizer(prompts)
        for prompt, row in zip(prompts, rows):
            chunks = tokenize_weighted(tokenizer, prompt)
            assert len(chunks) == 1
            assert chunks[0].ids == row.tolist(), prompt
            assert chunks[0].weights == [1.0] * 77


def test_weighted_chunk_layout(tok):
    (chunk,) = tokenize_weighted(tok, "an (important) word")
    body = tok.encode("an ") + tok.encode("important") + tok.encode(" word")
    assert chunk.ids == [BOS, *body, EOS] + [EOS] * (75 - len(body))
    assert chunk.weights == [1.0, 1.0, UP, 1.0] + [1.0] * 73
    assert len(chunk.ids) == len(chunk.weights) == 77


def test_a1111_docstring_prompt_weights_per_token(tok):
    (chunk,) = tokenize_weighted(tok, "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    spans = parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected_ids, expected_weights = [], []
    for text, weight in spans:
        ids = tok.encode(text)
        expected_ids += ids
        expected_weights += [weight] * len(ids)
    n = len(expected_ids)
    assert chunk.ids[: n + 2] == [BOS, *expected_ids, EOS]
    assert chunk.weights[1 : n + 1] == expected_weights
    # a, house, (" " has no token), on, a, hill, ",", sun, ",", sky, "."
    assert expected_weights == [1.0, 1.5730000000000004, 1.0, 1.1, 0.55, 1.1, 1.1, 1.1, 1.4641000000000006, 1.1]


def test_spans_are_tokenized_separately(tok):
    (chunk,) = tokenize_weighted(tok, "(good)ness")
    assert tok.encode("goodness") != tok.encode("good") + tok.encode("ness")
    assert chunk.ids[1:4] == [*tok.encode("good"), *tok.encode("ness"), EOS]
    assert chunk.weights[1:3] == [UP, 1.0]


def test_sd2_chunks_pad_with_zero_after_the_end_token(tok_sd2):
    (chunk,) = tokenize_weighted(tok_sd2, "a (cat)")
    assert chunk.ids[:4] == [BOS, 320, 2368, EOS] and chunk.ids[4:] == [0] * 73
    assert chunk.weights[:4] == [1.0, 1.0, UP, 1.0]


def test_break_starts_a_new_chunk(tok):
    chunks = tokenize_weighted(tok, "a cat BREAK a (dog)")
    assert len(chunks) == 2
    assert chunks[0].ids == tok("a cat")[0].tolist()
    assert chunks[1].ids == tok("a dog")[0].tolist()
    assert chunks[1].weights[:4] == [1.0, 1.0, UP, 1.0]


def test_leading_break_gives_an_empty_first_chunk(tok):
    chunks = tokenize_weighted(tok, "BREAK a cat")
    assert chunks[0] == empty_chunk(tok) and chunks[1].ids == tok("a cat")[0].tolist()
    assert len(tokenize_weighted(tok, "a cat BREAK")) == 1  # a trailing BREAK adds nothing


def test_empty_prompt_is_one_empty_chunk(tok):
    assert tokenize_weighted(tok, "") == [empty_chunk(tok)]
    assert empty_chunk(tok).ids == tok("")[0].tolist() == [BOS] + [EOS] * 76


def test_75_tokens_fit_one_chunk_76_need_two(tok):
    assert len(tok.encode("a " * 75)) == 75
    assert len(tokenize_weighted(tok, "a " * 75)) == 1
    first, second = tokenize_weighted(tok, "a " * 75 + "cat")
    assert first.ids == [BOS] + [320] * 75 + [EOS]
    assert second.ids == [BOS, 2368, EOS] + [EOS] * 74


def test_long_prompt_without_commas_breaks_every_75_tokens(tok):
    chunks = tokenize_weighted(tok, "a " * 200)
    assert [c.ids.count(320) for c in chunks] == [75, 75, 50]
    assert all(len(c.ids) == len(c.weights) == 77 and c.ids[0] == BOS for c in chunks)


def comma_prompt(cats, dogs, dog_weight=""):
    """`cats` times "cat", one comma, `dogs` times "dog": token ids 2368 (cat), 267 (,), 1929 (dog)."""
    dog = "(dog)" if dog_weight else "dog"
    return " ".join(["cat"] * cats) + ", " + " ".join([dog] * dogs)


def test_token_ids_used_by_the_comma_tests(tok):
    assert tok.encode(comma_prompt(2, 2)) == [2368, 2368, 267, 1929, 1929]
    assert tok.comma_token_id == 267


def test_comma_within_last_20_tokens_moves_the_words_after_it(tok):
    # comma at index 60: 75 - 60 = 15 <= 20, so the 14 dogs after it move on with the 6 that did not fit
    first, second = tokenize_weighted(tok, comma_prompt(60, 20))
    assert first.ids == [BOS] + [2368] * 60 + [267, EOS] + [EOS] * 14
    assert second.ids == [BOS] + [1929] * 20 + [EOS] + [EOS] * 55


def test_comma_backtrack_boundary_is_20_tokens(tok):
    # comma at index 55: 75 - 55 = 20 -> moves; at index 54: 21 -> stays
    first, _ = tokenize_weighted(tok, comma_prompt(55, 30))
    assert first.ids.count(1929) == 0 and first.ids[56] == 267
    first, second = tokenize_weighted(tok, comma_prompt(54, 30))
    assert first.ids.count(1929) == 75 - 55 and second.ids.count(1929) == 30 - 20


def test_comma_backtrack_can_be_disabled_or_changed(tok):
    first, second = tokenize_weighted(tok, comma_prompt(60, 20), comma_backtrack=0)
    assert first.ids.count(1929) == 14 and second.ids.count(1929) == 6
    first, _ = tokenize_weighted(tok, comma_prompt(60, 20), comma_backtrack=10)  # 15 > 10
    assert first.ids.count(1929) == 14
    with pytest.raises(ParameterError, match="comma_backtrack"):
        tokenize_weighted(tok, "x", comma_backtrack=75)


def test_moved_tokens_keep_their_weights(tok):
    first, second = tokenize_weighted(tok, comma_prompt(60, 20, dog_weight="up"))
    assert first.weights == [1.0] * 77
    assert second.weights[1:21] == [UP] * 20 and second.weights[21:] == [1.0] * 56


def test_comma_as_the_76th_token_starts_the_next_chunk(tok):
    first, second = tokenize_weighted(tok, comma_prompt(75, 3))
    assert first.ids == [BOS] + [2368] * 75 + [EOS]
    assert second.ids[:6] == [BOS, 267, 1929, 1929, 1929, EOS]


def test_stack_chunks(tok):
    chunks = tokenize_weighted(tok, "(a) " * 100)
    ids, weights = stack_chunks(chunks)
    assert ids.shape == weights.shape == (2, 77)
    assert ids.dtype == torch.long and weights.dtype == torch.float32
    assert ids[1].tolist() == chunks[1].ids and weights[0, 1].item() == pytest.approx(UP)


def test_chunk_is_frozen():
    chunk = Chunk([1], [1.0])
    with pytest.raises(AttributeError):
        chunk.ids = [2]


# ---------------------------------------------------------------------------------- apply_emphasis


def test_apply_emphasis_by_hand():
    hidden = torch.tensor([[[1.0], [3.0]]])  # (1, 2, 1): mean 2
    weights = torch.tensor([[2.0, 1.0]])
    # weighted [2, 3] has mean 2.5, so it is scaled by 2 / 2.5 = 0.8
    assert torch.allclose(apply_emphasis(hidden, weights), torch.tensor([[[1.6], [2.4]]]))
    assert torch.equal(apply_emphasis(hidden, weights, restore_mean=False), torch.tensor([[[2.0], [3.0]]]))


def test_apply_emphasis_matches_a1111_formula_for_one_prompt():
    hidden = torch.randn(1, 77, 16)
    weights = 1 + 0.3 * torch.rand(1, 77)
    weighted = hidden * weights[..., None]
    expected = weighted * (hidden.mean() / weighted.mean())
    assert torch.allclose(apply_emphasis(hidden, weights), expected, atol=1e-6)
    assert apply_emphasis(hidden, weights).mean().item() == pytest.approx(hidden.mean().item(), abs=1e-6)


def test_apply_emphasis_is_per_prompt():
    hidden, weights = torch.randn(3, 77, 8), 1 + torch.rand(3, 77)
    batched = apply_emphasis(hidden, weights)
    for i in range(3):
        assert torch.allclose(batched[i : i + 1], apply_emphasis(hidden[i : i + 1], weights[i : i + 1]))


def test_unit_weights_leave_hidden_states_untouched():
    hidden = torch.randn(2, 77, 8)
    assert apply_emphasis(hidden, torch.ones(2, 77)) is hidden


def test_apply_emphasis_keeps_dtype():
    hidden = torch.randn(1, 77, 8, dtype=torch.bfloat16)
    assert apply_emphasis(hidden, torch.full((1, 77), 1.2)).dtype == torch.bfloat16


def test_apply_emphasis_rejects_mismatched_shapes():
    with pytest.raises(ParameterError, match="expected \\(batch, tokens\\) = \\(2, 77\\)"):
        apply_emphasis(torch.randn(2, 77, 8), torch.ones(2, 76))


def test_chunks_feed_apply_emphasis(tok):
    _, weights = stack_chunks(tokenize_weighted(tok, "a (red:1.5) cat"))
    hidden = torch.randn(1, 77, 8)
    out = apply_emphasis(hidden, weights)
    ratio = out[0, 2] / hidden[0, 2] / (out[0, 1] / hidden[0, 1])  # "red" vs "a", same chunk scale
    assert torch.allclose(ratio, torch.full((8,), 1.5))


# --------------------------------------------------------------------------------------- LoRA tags


@pytest.mark.parametrize(
    "prompt, text, loras",
    [
        ("a cat <lora:style:0.8>, best", "a cat , best", [("style", 0.8)]),
        ("<lora:plain>a dog", "a dog", [("plain", 1.0)]),
        ("<lora:a:0.5> x <lora:b:-1> <LoRA:c:1.25>", " x  ", [("a", 0.5), ("b", -1.0), ("c", 1.25)]),
        ("<lora:my-style v1.5:.5>", "", [("my-style v1.5", 0.5)]),
        ("<lora:a:1><lora:a:0.5>", "", [("a", 1.0), ("a", 0.5)]),
        ("no tags (here:1.2) <3", "no tags (here:1.2) <3", []),
    ],
)
def test_extract_lora_tags(prompt, text, loras):
    assert extract_lora_tags(prompt) == (text, loras)


def test_other_extra_network_tags_are_removed_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="sdlab.prompts"):
        assert extract_lora_tags("a <hypernet:foo:1> cat") == ("a  cat", [])
    assert "<hypernet:foo:1>" in caplog.text


@pytest.mark.parametrize("tag", ["<lora::0.5>", "<lora:x:abc>", "<lora:x:0.5:0.7>", "<lora: :1>"])
def test_malformed_lora_tags(tag):
    with pytest.raises(ParameterError, match="lora"):
        extract_lora_tags(f"a cat {tag}")
