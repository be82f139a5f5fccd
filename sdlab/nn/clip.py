"""The CLIP text transformer that turns a prompt's token ids into Stable Diffusion's conditioning context.

One module covers both text encoders SD uses, chosen by `TextEncoderConfig`:

- SD 1.x: the text tower of OpenAI CLIP ViT-L/14 (Radford et al. 2021, "Learning Transferable Visual
  Models From Natural Language Supervision"): 12 layers of width 768, quick-GELU.
- SD 2.x: the text tower of OpenCLIP ViT-H/14 (Cherti et al. 2023, "Reproducible scaling laws for
  contrastive language-image learning"): width 1024, exact GELU, stored with 23 of its 24 layers.

Both are GPT-2-style causal transformers (Radford et al. 2019): learned position embeddings, pre-LayerNorm
residual layers, a final LayerNorm. Module names mirror the diffusers `text_encoder/` layout (that of
`transformers.CLIPTextModel` before transformers 5), so its files load with no key mapping. SD uses the
per-token hidden states only. SDXL's second encoder (OpenCLIP ViT-bigG/14: 32 layers of width 1280, exact
GELU) also gives a pooled vector, the final-LayerNormed state at the end-of-text token through a learned
text projection; `TextEncoder.encode` returns it with the hidden states (as
`transformers.CLIPTextModelWithProjection`'s `text_embeds`, whose state-dict names it keeps).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sdlab.config import TextEncoderConfig
from sdlab.errors import ParameterError

logger = logging.getLogger(__name__)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI CLIP was trained with (Hendrycks & Gimpel 2016)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    """Token embedding plus a learned embedding of each position 0..T-1."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[1]]  # (T, width)
        return self.token_embedding(input_ids) + positions  # (B, T, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Positions are always 0..T-1, so there is no `position_ids` buffer. Checkpoints written by
        # transformers < 4.31 still store one (it was persistent then); drop it so that they load strictly.
        stored = state_dict.pop(prefix + "position_ids", None)
        if stored is not None:
            _warn_if_unusual_position_ids(stored, prefix + "position_ids")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _warn_if_unusual_position_ids(stored: torch.Tensor, key: str) -> None:
    # Some merged SD 1.x checkpoints carry position ids corrupted into floats like 76.9999; other
    # implementations then embed wrong positions. Ignoring them is right, but worth saying.
    if stored.device.type == "meta":
        return
    expected = torch.arange(stored.shape[-1], dtype=torch.float64)
    if not torch.equal(stored.reshape(-1).to(torch.float64), expected):
        logger.warning("%s in the checkpoint is not 0..%d; ignoring it", key, stored.shape[-1] - 1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each token sees itself and the tokens before it."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, T, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, width = x.shape
        head_dim = width // self.num_heads
        return x.view(B, T, self.num_heads, head_dim).transpose(1, 2)  # (B, heads, T, head_dim)


class MLP(nn.Module):
    """Position-wise feed-forward network: width -> mlp_width -> width."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LN transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CausalSelfAttention(cfg.width, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of layers; it exists as a module only so that parameter names match the diffusers layout."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class TextTransformer(nn.Module):
    """Embeddings, the layer stack and the final LayerNorm (`text_model` in the diffusers layout)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def iter_hidden_states(self, input_ids: torch.Tensor, depth: int) -> Iterator[torch.Tensor]:
        """Yield the embeddings, then the output of each of the first `depth` layers; each (B, T, width)."""
        x = self.embeddings(input_ids)
        yield x
        for layer in self.encoder.layers[:depth]:
            x = layer(x)
            yield x


# The top-level names of the text model's parameters, as transformers >= 5 saves them.
_UNPREFIXED = ("embeddings.", "encoder.", "final_layer_norm.")


class TextEncoder(nn.Module):
    """CLIP text encoder: token ids (B, T) -> the per-token context (B, T, width) that the UNet attends to.

    `state_dict()` has the keys and shapes of the diffusers `text_encoder/` files of SD 1.x/2.x (those of
    `transformers.CLIPTextModel` before transformers 5, which dropped the `text_model.` prefix), so such a
    file loads strictly with no key mapping. With a `projection_dim` it also has `text_projection.weight`,
    the layout of SDXL's `text_encoder_2/` (`transformers.CLIPTextModelWithProjection`, in every version).
    Loading also accepts the legacy `position_ids` entry and the unprefixed keys that transformers >= 5
    writes for CLIPTextModel.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers >= 5 flattened CLIPTextModel and saves its keys without `text_model.`; published
        # SD checkpoints (and transformers < 5) have it. Accept both; keep the prefixed names.
        flat_names = [key[len(prefix) :] for key in state_dict if key.startswith(prefix)]
        for name in [name for name in flat_names if name.startswith(_UNPREFIXED)]:
            ours = prefix + "text_model." + name
            if ours not in state_dict:  # a clash stays an unexpected key, so strict loading reports it
                state_dict[ours] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """The conditioning context: the output of layer `num_layers - clip_skip + 1`, final-LayerNormed.

        clip_skip=1 takes the last layer, 2 the penultimate (the convention of A1111 and diffusers, which
        both apply the final LayerNorm to the layer they pick). Later layers are not computed.
        """
        self._check_input_ids(input_ids)
        self._check_clip_skip(clip_skip)
        depth = self.cfg.num_layers - clip_skip + 1
        for hidden in self.text_model.iter_hidden_states(input_ids, depth):
            pass  # only the deepest one is needed; the loop drops the others as it goes
        return self.text_model.final_layer_norm(hidden)

    def encode(
        self, input_ids: torch.Tensor, clip_skip: int = 2, final_layer_norm: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning from one pass: (hidden (B, T, width), pooled (B, projection_dim)).

        `hidden` is the output of layer `num_layers - clip_skip + 1` (clip_skip as in `forward`), raw by
        default as SDXL uses it (diffusers' `hidden_states[-2]`), or final-LayerNormed as `forward` gives it.
        `pooled` always comes from the last layer: its final-LayerNormed state at each prompt's end-of-text
        token (found by the config's `eos_token_id` rule), through the text projection when the config
        has one (`text_embeds` in transformers), else as it is (`pooler_output`). diffusers' SDXL
        `clip_skip=k` (`hidden_states[-(k + 2)]`) is `clip_skip=k + 2` here.
        """
        self._check_input_ids(input_ids)
        self._check_clip_skip(clip_skip)
        chosen = self.cfg.num_layers - clip_skip + 1  # index into embeddings + layer outputs
        for index, last in enumerate(self.text_model.iter_hidden_states(input_ids, self.cfg.num_layers)):
            if index == chosen:
                hidden = last
        if final_layer_norm:
            hidden = self.text_model.final_layer_norm(hidden)
        return hidden, self._pool(self.text_model.final_layer_norm(last), input_ids)

    def _pool(self, normed: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-LayerNormed states (B, T, width) at the end-of-text tokens, projected: (B, P)."""
        rows = torch.arange(normed.shape[0], device=normed.device)
        pooled = normed[rows, eos_positions(input_ids, self.cfg.eos_token_id).to(normed.device)]  # (B, width)
        return self.text_projection(pooled) if self.cfg.projection_dim is not None else pooled

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings and every layer's output, before the final LayerNorm: num_layers + 1 tensors
        of shape (B, T, width), as `output_hidden_states=True` gives in transformers."""
        self._check_input_ids(input_ids)
        return list(self.text_model.iter_hidden_states(input_ids, self.cfg.num_layers))

    def _check_clip_skip(self, clip_skip: int) -> None:
        is_integer = isinstance(clip_skip, int) and not isinstance(clip_skip, bool)
        if not (is_integer and 1 <= clip_skip <= self.cfg.num_layers):
            raise ParameterError(
                f"clip_skip={clip_skip!r} is out of range: give an integer from 1 (the last layer) to "
                f"{self.cfg.num_layers} (the first layer) for this {self.cfg.num_layers}-layer text encoder"
            )

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        _check_ids_shape(input_ids, self.cfg.max_length)
        _check_ids_range(input_ids, self.cfg.vocab_size)


def eos_positions(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """The position of each prompt's end-of-text token: (B, T) ids -> (B,) int64, as transformers finds it.

    None (transformers' rule when its config says eos_token_id 2): the first position of the largest id,
    which is <|endoftext|> (49407) in CLIP's vocabulary. An id: the first position holding it; a prompt
    without one gets position 0, as in transformers (tokenizers always end a prompt or chunk with it).
    """
    if eos_token_id is None:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def _check_config(cfg: TextEncoderConfig) -> None:
    if cfg.activation not in ACTIVATIONS:
        raise ParameterError(
            f"TextEncoderConfig.activation={cfg.activation!r} is unknown; valid: {sorted(ACTIVATIONS)}"
        )
    if cfg.width % cfg.num_heads:
        raise ParameterError(
            f"TextEncoderConfig.width={cfg.width} is not divisible by num_heads={cfg.num_heads}; "
            "each head needs an equal share of the width"
        )


def _check_ids_shape(input_ids: torch.Tensor, max_length: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise ParameterError(f"input_ids must be a torch.Tensor of token ids; got {type(input_ids).__name__}")
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ParameterError(
            f"input_ids must be an int64 (or int32) tensor of shape (batch, tokens); got a {input_ids.dtype} "
            f"tensor of shape {tuple(input_ids.shape)}"
        )
    if not 1 <= input_ids.shape[1] <= max_length:
        raise ParameterError(
            f"input_ids has {input_ids.shape[1]} tokens per prompt; the text encoder has {max_length} "
            f"positions, so give 1 to {max_length} tokens (split longer prompts into chunks)"
        )


def _check_ids_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    # One host sync per prompt batch; it turns an opaque device-side assert into a clear message.
    if input_ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        raise ParameterError(
            f"input_ids holds token ids from {low} to {high}; valid ids are 0..{vocab_size - 1} "
            "(vocab_size in TextEncoderConfig)"
        )
