"""CLIP's byte-level BPE text tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), assembled from HuggingFace's Rust `tokenizers` building blocks.

The pipeline reproduces `transformers.CLIPTokenizer` (v5) id for id:

1. added tokens: `<|startoftext|>`, `<|endoftext|>` and the pad token are matched in the text before
   anything else (so a pad token "!" in an SD 2.x folder turns every "!" into id 0, as transformers does).
   Each is matched either in the raw text or after normalizing (then "<|StartOfText|>" matches too),
   following the `normalized` flags of the folder's token maps;
2. normalizer: Unicode NFC, every whitespace run folded to one space, lowercase. Like transformers v5 there
   is no ftfy / HTML-unescape pass: "&amp;" stays five characters;
3. pre-tokenizer: CLIP's regex keeps words, single digits (CLIP splits numbers digit by digit), runs of
   other symbols and English contractions; then every byte is mapped to a printable unicode symbol
   (GPT-2's byte-level trick), so no input is ever unknown;
4. model: BPE whose word-final symbols carry the `</w>` suffix.

Start and end tokens, padding and truncation are added here in Python, where the rules are easy to read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdlab.errors import TokenizerError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context: start + 75 text tokens + end
MERGES_HEADER = "#version: 0.2"

# CLIP's word splitter: special tokens, English contractions, letter runs, single digits, symbol runs.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class _Vocabulary:
    """The two files that define a BPE vocabulary, parsed: token -> id, and merges in priority order."""

    token_to_id: dict[str, int]
    merges: list[tuple[str, str]]


class CLIPTokenizer:
    """CLIP tokenizer: `encode` gives bare ids, calling it gives a padded (B, max_length) LongTensor.

    Args:
        vocab: token -> id, as in a `vocab.json`; must contain `<|startoftext|>` and `<|endoftext|>`.
        merges: BPE merges in priority order, as in `merges.txt`.
        pad_token: the padding token: `<|endoftext|>` for SD 1.x, "!" (id 0) for SD 2.x.
        max_length: the text encoder's context length.
        normalized_special_tokens: the special tokens that are matched after normalization (lowercasing
            etc.) rather than in the raw text. None: as the SD 1.x/2.x folders on the Hub declare them, which
            is the start token, plus the end token unless it is also the pad token.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = MAX_LENGTH,
        normalized_special_tokens: Iterable[str] | None = None,
    ):
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise TokenizerError(f"the vocabulary has no token {token!r}; a CLIP vocabulary needs "
                                     f"{BOS_TOKEN!r}, {EOS_TOKEN!r} and its pad token")
        if max_length < 2:
            raise TokenizerError(f"max_length={max_length} leaves no room for start and end tokens; use >= 2")
        self._vocab = _Vocabulary(dict(vocab), list(merges))
        self._id_to_token = {i: t for t, i in vocab.items()}
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token = pad_token
        self.pad_token_id = vocab[pad_token]
        self.max_length = max_length
        if normalized_special_tokens is None:
            normalized_special_tokens = {BOS_TOKEN} | ({EOS_TOKEN} if pad_token != EOS_TOKEN else set())
        self.normalized_special_tokens = frozenset(normalized_special_tokens)
        self._backend = _build_backend(self._vocab, self._special_tokens())

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def default(cls, pad_token_id: int = 49407, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
        """The CLIP vocabulary shipped with sdlab; pad with 49407 (SD 1.x) or 0 (SD 2.x); `max_length` ids
        per sequence (77 for SD; small models may use a shorter context)."""
        folder = resources.files("sdlab") / "data" / "clip"
        vocab = _read_vocab(Path(str(folder)))
        id_to_token = {i: t for t, i in vocab.token_to_id.items()}
        if pad_token_id not in id_to_token:
            raise TokenizerError(f"pad_token_id={pad_token_id} is not in the CLIP vocabulary "
                                 f"(ids 0..{len(id_to_token) - 1}); SD 1.x uses 49407, SD 2.x uses 0")
        return cls(vocab.token_to_id, vocab.merges, pad_token=id_to_token[pad_token_id], max_length=max_length)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a diffusers-style `tokenizer/` folder (vocab.json, merges.txt, optional token maps)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a directory")
        vocab = _read_vocab(folder)
        config = _read_optional_json(folder / CONFIG_FILE)
        pad_token, normalized = _special_tokens_from(folder, config)
        if pad_token not in vocab.token_to_id:
            raise TokenizerError(f"the pad token {pad_token!r} named in {folder} is not in its {VOCAB_FILE}")
        max_length = config.get("model_max_length", MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10_000:  # transformers writes 1e30 for "unset"
            max_length = MAX_LENGTH
        return cls(vocab.token_to_id, vocab.merges, pad_token, max_length, normalized_special_tokens=normalized)

    def save(self, folder: str | Path) -> None:
        """Write the four files of a diffusers `tokenizer/` folder that transformers can load back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_text = json.dumps(self._vocab.token_to_id, ensure_ascii=False)
        (folder / VOCAB_FILE).write_text(vocab_text, encoding="utf-8")
        merge_lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in self._vocab.merges]
        (folder / MERGES_FILE).write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
        special = {key: self._token_entry(token) for key, token in
                   (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", EOS_TOKEN),
                    ("pad_token", self.pad_token))}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special}
        for name, content in ((SPECIAL_TOKENS_FILE, special), (CONFIG_FILE, config)):
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")

    def _special_tokens(self) -> list[AddedToken]:
        unique = dict.fromkeys([self.pad_token, BOS_TOKEN, EOS_TOKEN])  # ordered, without duplicates
        return [AddedToken(t, normalized=t in self.normalized_special_tokens, special=True) for t in unique]

    def _token_entry(self, token: str) -> dict:
        """A special token as transformers serializes an AddedToken."""
        return {"content": token, "lstrip": False, "normalized": token in self.normalized_special_tokens,
                "rstrip": False, "single_word": False}

    # ---------------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.token_to_id)

    @property
    def comma_token_id(self) -> int | None:
        """Id of a word-final comma, which A1111's prompt chunking breaks at; None if the vocab lacks it."""
        return self._vocab.token_to_id.get("," + END_OF_WORD)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts (runs in parallel inside the Rust library)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: str | list[str], max_length: int | None = None, truncate: bool = True) -> torch.Tensor:
        """Padded ids, (B, max_length) int64: start, text, end, then pad tokens.

        With `truncate`, text beyond `max_length - 2` tokens is dropped and the end token stays last, as
        transformers does with `padding="max_length", truncation=True`. Without it, rows are padded to the
        longest one (never shorter than `max_length`).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_length = self.max_length if max_length is None else max_length
        if max_length < 2:
            raise TokenizerError(f"max_length={max_length} leaves no room for start and end tokens; use >= 2")
        rows = [self.wrap(ids, max_length - 2 if truncate else None) for ids in self.encode_batch(texts)]
        width = max([max_length] + [len(r) for r in rows])
        padded = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)

    def wrap(self, ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Start token + the first `max_tokens` of `ids` (all when None) + end token; no padding."""
        kept = ids if max_tokens is None else ids[:max_tokens]
        return [self.bos_token_id, *kept, self.eos_token_id]

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; word ends become spaces. Start/end/pad tokens are dropped unless asked for."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token.get(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.token_to_id.get(token)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r}, "
                f"max_length={self.max_length})")


# ------------------------------------------------------------------------------------------ internals


def _build_backend(vocab: _Vocabulary, special_tokens: list[AddedToken]) -> Tokenizer:
    """The Rust tokenizer: normalizer -> pre-tokenizer -> BPE, with the special tokens matched first."""
    try:
        model = BPE(vocab=vocab.token_to_id, merges=vocab.merges, end_of_word_suffix=END_OF_WORD,
                    continuing_subword_prefix="", unk_token=EOS_TOKEN, fuse_unk=False, dropout=None)
    except Exception as exc:  # the Rust side rejects merges of unknown tokens, with a terse message
        raise TokenizerError(f"vocab.json and merges.txt do not fit together: {exc}") from exc
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True: the regex describes the pieces to keep; whatever lies between them (spaces) is dropped
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special_tokens)
    return backend


def _read_vocab(folder: Path) -> _Vocabulary:
    return _Vocabulary(_read_token_ids(folder), _read_merges(folder))


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise TokenizerError(f"tokenizer folder {folder} is missing {name}; a CLIP tokenizer folder needs "
                             f"{VOCAB_FILE} and {MERGES_FILE}")
    return path


def _read_token_ids(folder: Path) -> dict[str, int]:
    path = _require(folder, VOCAB_FILE)
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path} must hold a non-empty JSON object mapping token strings to integer ids")
    bad = [k for k, v in vocab.items() if type(v) is not int or v < 0]
    if bad:
        raise TokenizerError(f"{path}: ids must be non-negative integers; {bad[0]!r} maps to {vocab[bad[0]]!r}")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerError(f"{path}: two tokens share one id; every id must be unique")
    missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab]
    if missing:
        raise TokenizerError(f"{path} lacks {missing[0]!r}; a CLIP vocabulary needs {BOS_TOKEN!r} and {EOS_TOKEN!r}")
    return vocab


def _read_merges(folder: Path) -> list[tuple[str, str]]:
    path = _require(folder, MERGES_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path} is not valid UTF-8: {exc}") from exc
    merges = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path} line {number}: expected two symbols separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return content


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order


def _special_tokens_from(folder: Path, config: dict) -> tuple[str, set[str]]:
    """The pad token, and which special tokens are matched after normalizing, as transformers resolves them.

    special_tokens_map.json overrides tokenizer_config.json, except in newer folders whose config carries
    `added_tokens_decoder`: transformers then ignores the map and takes the flags from that list. Within
    one source a later key overrides an earlier one of the same text (a plain-string pad "<|endoftext|>"
    clears the `normalized` flag of the end token). SD 2.x folders name "!" as pad in the map.
    """
    entries = {key: config[key] for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        special_map = _read_optional_json(folder / SPECIAL_TOKENS_FILE)
        entries.update({key: special_map[key] for key in SPECIAL_TOKEN_KEYS if special_map.get(key) is not None})
        decoder = {}
    flags = {}
    for entry in [entries[key] for key in SPECIAL_TOKEN_KEYS if key in entries] + list(decoder.values()):
        content, normalized = _parse_token_entry(entry, folder)
        flags[content] = normalized
    pad = _parse_token_entry(entries["pad_token"], folder)[0] if "pad_token" in entries else EOS_TOKEN
    return pad, {token for token, normalized in flags.items() if normalized}


def _parse_token_entry(entry: object, folder: Path) -> tuple[str, bool]:
    """(text, normalized) of a token entry: a plain string, or a serialized AddedToken dict."""
    if isinstance(entry, str):
        return entry, False
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"], bool(entry.get("normalized", False))
    raise TokenizerError(f"special token entry {entry!r} in {folder} must be a string or {{'content': ...}}")
