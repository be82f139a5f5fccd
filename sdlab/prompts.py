"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, 75-token chunks, and `<lora:name:w>` tags.

Semantics follow stable-diffusion-webui (`prompt_parser.parse_prompt_attention` and the chunking of
`sd_hijack_clip`), re-implemented here:

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.5)` sets the
  factor to 1.5; brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; any
  other backslash is dropped. A `)` or `]` without an opener is literal text; an opener left unclosed at
  the end applies its factor to everything after it.
- `BREAK` (upper case, a whole word) ends the current 75-token chunk. One deliberate difference: A1111
  marks BREAK by weight -1 and so, inside brackets, its weight gets multiplied and it turns into the
  literal word "BREAK"; here BREAK always breaks.
- Chunking: the text tokens go into chunks of 75, each wrapped as start + 75 + end (pad after the end)
  = 77 ids for the text encoder. When a chunk is full and the last comma lies within its last 20 tokens,
  the tokens after that comma move to the next chunk (A1111's `comma_padding_backtrack`, default 20).
- Each span of equal weight is tokenized on its own, as in A1111: `(good)ness` gives "good" + "ness".

A prompt without any of this syntax gives one chunk equal to the plain tokenizer's 77 ids.
Prompt editing (`[a:b:0.5]`), alternation (`[a|b]`) and textual-inversion embeddings are not supported:
their brackets are read as emphasis.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from sdlab.errors import ParameterError

logger = logging.getLogger(__name__)

EMPHASIS_FACTOR = 1.1  # "(x)" multiplies by this, "[x]" divides by it
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
BREAK_KEYWORD = "BREAK"


class Span(NamedTuple):
    """A run of prompt text and the weight its tokens get."""

    text: str
    weight: float


BREAK = Span(BREAK_KEYWORD, -1.0)  # the chunk-break marker in `parse_emphasis` output, as A1111 writes it


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: 77 ids (start, up to 75 text tokens, end, pad) and a weight per id."""

    ids: list[int]
    weights: list[float]


class TokenizerLike(Protocol):
    """What chunking needs from a tokenizer (sdlab.tokenizer.CLIPTokenizer provides it)."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_length: int
    comma_token_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


# ----------------------------------------------------------------------------------------- emphasis

_LEXEME = re.compile(
    r"""
    (?P<escaped>\\[\\()\[\]])                       # \( \) \[ \] \\ : the character itself
    | (?P<stray_backslash>\\)                       # any other backslash: dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)              # ":1.5)": closes "(" with an explicit factor
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


class _Piece:
    """A mutable span while parsing; breaks are never re-weighted nor merged."""

    def __init__(self, text: str, weight: float = 1.0, is_break: bool = False):
        self.text, self.weight, self.is_break = text, weight, is_break


class _EmphasisParser:
    """One pass over the lexemes with a stack of open "(" and one of open "[" (kept apart, as in A1111)."""

    def __init__(self):
        self.pieces: list[_Piece] = []
        self.open_round: list[int] = []  # index into `pieces` where each unclosed "(" started
        self.open_square: list[int] = []

    def feed(self, match: re.Match) -> None:
        if match["escaped"]:
            self.pieces.append(_Piece(match["escaped"][1]))
        elif match["stray_backslash"]:
            pass
        elif match["open"]:
            (self.open_round if match["open"] == "(" else self.open_square).append(len(self.pieces))
        elif match["weight"] is not None and self.open_round:
            self.scale_from(self.open_round.pop(), _parse_weight(match["weight"]))
        elif match["close"] == ")" and self.open_round:
            self.scale_from(self.open_round.pop(), EMPHASIS_FACTOR)
        elif match["close"] == "]" and self.open_square:
            self.scale_from(self.open_square.pop(), 1 / EMPHASIS_FACTOR)
        else:  # plain text, ":", or a closer/weight with nothing open: literal text
            self.add_text(match[0])

    def add_text(self, text: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(text)):
            if i > 0:
                self.pieces.append(_Piece(BREAK_KEYWORD, BREAK.weight, is_break=True))
            self.pieces.append(_Piece(part))

    def scale_from(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            if not piece.is_break:
                piece.weight *= factor

    def finish(self) -> list[Span]:
        for start in self.open_round:  # unclosed openers reach to the end, outermost first
            self.scale_from(start, EMPHASIS_FACTOR)
        for start in self.open_square:
            self.scale_from(start, 1 / EMPHASIS_FACTOR)
        return _merge_equal_weights(self.pieces) or [Span("", 1.0)]


def _parse_weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ParameterError(f"emphasis weight {text!r} in the prompt is not a number; "
                             f"write it like (word:1.2) or (word:0.8)") from None


def _merge_equal_weights(pieces: list[_Piece]) -> list[Span]:
    """Join neighbouring text pieces of exactly equal weight (so "(a)(b)" is one span "ab")."""
    spans: list[Span] = []
    for piece in pieces:
        if piece.is_break:
            spans.append(BREAK)
        elif spans and spans[-1] is not BREAK and spans[-1].weight == piece.weight:
            spans[-1] = Span(spans[-1].text + piece.text, piece.weight)
        else:
            spans.append(Span(piece.text, piece.weight))
    return spans


def parse_emphasis(text: str) -> list[Span]:
    """Split a prompt into (text, weight) spans; a BREAK keyword becomes the `BREAK` span ("BREAK", -1.0).

    >>> parse_emphasis("an (important) word")
    [Span(text='an ', weight=1.0), Span(text='important', weight=1.1), Span(text=' word', weight=1.0)]
    """
    parser = _EmphasisParser()
    for match in _LEXEME.finditer(text):
        parser.feed(match)
    return parser.finish()


# ----------------------------------------------------------------------------------------- chunking


class _ChunkBuilder:
    """Fills 75-token chunks, moving the words after a late comma on to the next chunk (A1111)."""

    def __init__(self, tokenizer: TokenizerLike, comma_backtrack: int):
        self.tokenizer = tokenizer
        self.size = tokenizer.max_length - 2  # text tokens per chunk: 75
        self.comma_backtrack = comma_backtrack
        self.chunks: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1  # index in `ids` of the latest comma in this chunk

    def add(self, token: int, weight: float) -> None:
        if token == self.tokenizer.comma_token_id:
            self.last_comma = len(self.ids)
        elif len(self.ids) == self.size and self._comma_is_near_end():
            self._move_words_after_comma()
        if len(self.ids) == self.size:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def _comma_is_near_end(self) -> bool:
        return self.comma_backtrack > 0 and self.last_comma >= 0 and self.size - self.last_comma <= self.comma_backtrack

    def _move_words_after_comma(self) -> None:
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        del self.ids[cut:], self.weights[cut:]
        self.close()
        self.ids, self.weights = moved_ids, moved_weights

    def close(self) -> None:
        """Wrap the pending tokens as start + tokens + end + pad (77 ids), weights 1.0 outside the text."""
        tok, fill = self.tokenizer, self.size - len(self.ids)
        ids = [tok.bos_token_id, *self.ids, tok.eos_token_id] + [tok.pad_token_id] * fill
        weights = [1.0, *self.weights, 1.0] + [1.0] * fill
        self.chunks.append(Chunk(ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> list[Chunk]:
        if self.ids or not self.chunks:  # an empty prompt still gives one (empty) chunk
            self.close()
        return self.chunks


def tokenize_weighted(tokenizer: TokenizerLike, text: str, comma_backtrack: int | None = None) -> list[Chunk]:
    """Chunks of 77 ids and weights for a prompt in A1111 syntax (strip `<lora:...>` tags first).

    `comma_backtrack=0` turns the comma rule off (chunks then break strictly every 75 tokens); the default
    is A1111's 20, or less for a tokenizer with a shorter context.
    """
    if comma_backtrack is None:
        comma_backtrack = min(COMMA_BACKTRACK, tokenizer.max_length - 3)
    if comma_backtrack < 0 or comma_backtrack >= tokenizer.max_length - 2:
        raise ParameterError(f"comma_backtrack={comma_backtrack} must be in 0..{tokenizer.max_length - 3}")
    spans = parse_emphasis(text)
    builder = _ChunkBuilder(tokenizer, comma_backtrack)
    for span, ids in zip(spans, tokenizer.encode_batch([s.text for s in spans])):
        if span is BREAK:  # the marker object itself, not any span that happens to equal it
            builder.close()
            continue
        for token in ids:
            builder.add(token, span.weight)
    return builder.finish()


def empty_chunk(tokenizer: TokenizerLike) -> Chunk:
    """The chunk of an empty prompt, used to pad a shorter prompt's chunk list (as A1111 does)."""
    return _ChunkBuilder(tokenizer, 0).finish()[0]


def stack_chunks(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks as tensors: ids (N, 77) int64 and weights (N, 77) float32."""
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
    return ids, weights


# ----------------------------------------------------------------------------------------- encoding


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, restore_mean: bool = True) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's hidden state by its weight, then rescale the whole
    chunk so its mean is what it was before (this keeps heavily weighted prompts from blowing up).

    Call it once per 77-token chunk, on the text encoder's output, before concatenating the chunks.
    hidden: (B, T, D); weights: (B, T). The mean is taken per prompt over (T, D); A1111 takes one mean
    over the whole batch, which is the same for a batch of one prompt or of copies of one prompt.
    """
    if weights.shape != hidden.shape[:2]:
        raise ParameterError(f"emphasis weights have shape {tuple(weights.shape)}, expected (batch, tokens) = "
                             f"{tuple(hidden.shape[:2])} to match hidden states {tuple(hidden.shape)}")
    weights = weights.to(device=hidden.device, dtype=hidden.dtype)
    if bool((weights == 1).all()):
        return hidden  # nothing to do; keeps plain prompts bit-identical
    weighted = hidden * weights.unsqueeze(-1)  # (B, T, D)
    if not restore_mean:
        return weighted
    old_mean = hidden.float().mean(dim=(1, 2), keepdim=True)  # (B, 1, 1), in fp32 for fp16 inputs
    new_mean = weighted.float().mean(dim=(1, 2), keepdim=True)
    # A mean of (almost) zero cannot be restored by scaling (e.g. a final layer norm without bias): keep
    # the weighted states as they are rather than divide by ~0.
    ratio = torch.where(new_mean.abs() > 1e-6, old_mean / new_mean, torch.ones_like(new_mean))
    return weighted * ratio.to(hidden.dtype)


# ---------------------------------------------------------------------------------------- LoRA tags

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax: <kind:arg:arg...>


def extract_lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove `<lora:name>` / `<lora:name:weight>` tags; return the remaining text and (name, weight) pairs.

    As in A1111, every `<kind:...>` extra-network tag is removed from the text; kinds other than
    "lora" are logged and ignored. The weight defaults to 1.0.
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        kind, args = match[1], match[2]
        if kind.lower() == "lora":
            loras.append(_parse_lora_args(args, match[0]))
        else:
            logger.warning("ignoring unsupported extra-network tag %s in the prompt", match[0])
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, text), loras


def _parse_lora_args(args: str, tag: str) -> tuple[str, float]:
    parts = args.split(":")
    name = parts[0].strip()
    if not name or len(parts) > 2:
        raise ParameterError(f"LoRA tag {tag!r} is malformed; write <lora:name> or <lora:name:weight>, "
                             f"e.g. <lora:my_style:0.8>")
    if len(parts) == 1:
        return name, 1.0
    try:
        return name, float(parts[1])
    except ValueError:
        raise ParameterError(f"LoRA tag {tag!r}: weight {parts[1]!r} is not a number; "
                             f"write e.g. <lora:{name}:0.8>") from None
