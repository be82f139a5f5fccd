"""Prompt -> text-encoder context, with A1111's prompt syntax.

Each prompt is split into 75-token chunks (`sdlab.prompts`: emphasis weights, `BREAK`, comma backtracking);
each chunk is encoded as its own 77-token sequence and the results are concatenated along the token axis,
so a prompt of N chunks gives a (77 N, D) context. All prompts of one call (conditional and unconditional
alike) are padded to the same number of chunks with empty ones, so that they stack into one batch. A plain
prompt of at most 75 tokens gives exactly the tokenizer's 77 ids, i.e. the reference pipeline's context.

SDXL chunks the prompts once per text encoder, pads both to the larger count (`encode_chunks`'s
`n_chunks`; their vocabularies are the same, so the counts agree in practice), concatenates the contexts
along the feature axis and takes the pooled output of each prompt's first chunk, as A1111 does.
"""

from __future__ import annotations

import torch

from .prompts import Chunk, apply_emphasis, empty_chunk, stack_chunks, tokenize_weighted


def chunk_prompts(tokenizer, prompts: list[str]) -> list[list[Chunk]]:
    """Each prompt's 77-id chunks (weights per id)."""
    return [tokenize_weighted(tokenizer, p) for p in prompts]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """SD 1.x/2.x: B prompts -> context (B, 77 N, D), the layer `clip_skip` counts from the end (A1111's
    convention: 1 = the last), final-LayerNormed, on the encoder's device."""
    chunked = chunk_prompts(tokenizer, prompts)
    return encode_chunks(tokenizer, text_encoder, chunked, clip_skip)[0]


@torch.no_grad()
def encode_chunks(tokenizer, text_encoder, chunked: list[list[Chunk]], clip_skip: int = 1, *, raw: bool = False,
                  n_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B chunked prompts (`chunk_prompts`), padded to `n_chunks` (default: the longest) -> (context
    (B, 77 N, D), pooled (B, P) of each first chunk) on the encoder's device.

    SD 1.x/2.x (`raw=False`) take the `clip_skip` layer final-LayerNormed and have no pooled output (None);
    SDXL (`raw=True`) takes it as it is and the pooled, projected end-of-text state of the last layer
    (`TextEncoder.encode`)."""
    n = n_chunks or max(len(c) for c in chunked)
    chunked = [c + [empty_chunk(tokenizer)] * (n - len(c)) for c in chunked]
    ids, weights = stack_chunks([chunk for chunks in chunked for chunk in chunks])  # (B N, 77) each
    device = next(text_encoder.parameters()).device
    ids = ids.to(device)
    pooled = None
    if raw:
        hidden, pooled = text_encoder.encode(ids, clip_skip=clip_skip)  # (B N, 77, D), (B N, P)
        pooled = pooled.reshape(len(chunked), n, -1)[:, 0]  # the first chunk's, as A1111
    else:
        hidden = text_encoder(ids, clip_skip=clip_skip)  # (B N, 77, D)
    hidden = apply_emphasis(hidden, weights.to(device, hidden.dtype))
    return hidden.reshape(len(chunked), n * hidden.shape[1], hidden.shape[2]), pooled
