"""Prompt -> text-encoder context, with A1111's prompt syntax.

Each prompt is split into 75-token chunks (`sdlab.prompts`: emphasis weights, `BREAK`, comma backtracking);
each chunk is encoded as its own 77-token sequence and the results are concatenated along the token axis,
so a prompt of N chunks gives a (77 N, D) context. All prompts of one call (conditional and unconditional
alike) are padded to the same number of chunks with empty ones (at least `min_chunks`), so that they stack
into one batch. A plain prompt of at most 75 tokens gives exactly the tokenizer's 77 ids, i.e. the
reference pipeline's context.

SDXL runs this once per text encoder (their contexts are concatenated along the feature axis) and takes
the pooled output of each prompt's first chunk, as A1111 does.
"""

from __future__ import annotations

import torch

from .prompts import apply_emphasis, empty_chunk, stack_chunks, tokenize_weighted


def chunk_count(tokenizer, prompts: list[str]) -> int:
    """The number of 75-token chunks the longest of `prompts` needs."""
    return max(len(tokenize_weighted(tokenizer, p)) for p in prompts)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1, *, raw: bool = False,
                   min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """B prompts -> (context (B, 77 N, D), pooled (B, P) of each first chunk) on the encoder's device.

    `clip_skip` counts from the last layer as A1111 does (1 = the last). SD 1.x/2.x (`raw=False`) take that
    layer final-LayerNormed and have no pooled output (None); SDXL (`raw=True`) takes it as it is and the
    pooled, projected end-of-text state of the last layer (`TextEncoder.encode`)."""
    chunked = [tokenize_weighted(tokenizer, p) for p in prompts]
    n = max(min_chunks, *(len(c) for c in chunked))
    chunked = [c + [empty_chunk(tokenizer)] * (n - len(c)) for c in chunked]
    ids, weights = stack_chunks([chunk for chunks in chunked for chunk in chunks])  # (B N, 77) each
    device = next(text_encoder.parameters()).device
    ids = ids.to(device)
    pooled = None
    if raw:
        hidden, pooled = text_encoder.encode(ids, clip_skip=clip_skip)  # (B N, 77, D), (B N, P)
        pooled = pooled.reshape(len(prompts), n, -1)[:, 0]  # the first chunk's, as A1111
    else:
        hidden = text_encoder(ids, clip_skip=clip_skip)  # (B N, 77, D)
    hidden = apply_emphasis(hidden, weights.to(device, hidden.dtype))
    return hidden.reshape(len(prompts), n * hidden.shape[1], hidden.shape[2]), pooled
