"""Prompt -> text-encoder context, with A1111's prompt syntax.

Each prompt is split into 75-token chunks (`sdlab.prompts`: emphasis weights, `BREAK`, comma backtracking);
each chunk is encoded as its own 77-token sequence and the results are concatenated along the token axis,
so a prompt of N chunks gives a (77 N, D) context. All prompts of one call (conditional and unconditional
alike) are padded to the same number of chunks with empty ones, so that they stack into one batch.
A plain prompt of at most 75 tokens gives exactly the tokenizer's 77 ids, i.e. the reference pipeline's
context.
"""

from __future__ import annotations

import torch

from .prompts import apply_emphasis, empty_chunk, stack_chunks, tokenize_weighted


@torch.no_grad()
def encode_prompts(model, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """prompts: B strings -> context (B, 77 N, D) on the model's device and dtype."""
    tokenizer = model.tokenizer
    chunked = [tokenize_weighted(tokenizer, p) for p in prompts]
    n = max(len(c) for c in chunked)
    chunked = [c + [empty_chunk(tokenizer)] * (n - len(c)) for c in chunked]
    ids, weights = stack_chunks([chunk for chunks in chunked for chunk in chunks])  # (B N, 77) each
    device = model.device
    hidden = model.text_encoder(ids.to(device), clip_skip=clip_skip)  # (B N, 77, D)
    hidden = apply_emphasis(hidden, weights.to(device, hidden.dtype))
    return hidden.reshape(len(prompts), n * hidden.shape[1], hidden.shape[2]).to(model.dtype)
