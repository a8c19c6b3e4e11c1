"""LLaMA-style decoder-only language model (Touvron et al., 2023).

For token ids ``idx`` of shape ``[B, T]`` and width ``D``:

    h_0 = embed(idx)                                        [B, T, D]
    h'_l = h_{l-1} + o_proj(CausalAttn(RoPE(q), RoPE(k), v)),  q/k/v = {q,k,v}_proj(RMSNorm(h_{l-1}))
    h_l  = h'_l + down_proj(SiLU(gate_proj(u)) * up_proj(u)),  u = RMSNorm(h'_l)
    logits = lm_head(RMSNorm(h_L))                          [B, T, vocab_size]

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight

Rotary position embedding (RoPE, Su et al., 2021) rotates each pair of
channels ``(x_i, x_{i + d/2})`` of a head (``d`` = head dim) at position ``m``
by the angle ``m * theta_i`` with ``theta_i = base^(-2i/d)``:

    RoPE(x)_m = x_m * cos(m theta) + rotate_half(x_m) * sin(m theta),
    rotate_half([x1, x2]) = [-x2, x1],

so that ``<RoPE(q)_m, RoPE(k)_n>`` depends on ``m - n`` only.

All projections are bias-free ``nn.Linear`` layers; the embedding is an
``nn.Embedding`` named ``embed`` and the output layer an ``nn.Linear`` named
``lm_head``. With ``tie_embeddings=True`` the two modules hold the *same*
``Parameter`` object (each reads it only inside its own forward).

Presets (:data:`LLAMA_CONFIGS`; untied embeddings, counts from
:func:`count_parameters`, which includes the embedding and the output head):

=============  =====  ====  ======  =====  ======  =======  ===========
name           vocab  dim   layers  heads  hidden  max_seq  parameters
=============  =====  ====  ======  =====  ======  =======  ===========
llama-1m          96   128       5      4     352      256    1,029,504
llama-10m         96   384       6      6    1024      256   10,695,552
llama-9m       32000   128       4      4     352     1024    8,995,968
llama-20m      32000   256       5      4     704     1024   20,400,896
llama-30m      32000   320       8      5     864     1024   30,397,760
llama-95m      32000   640      11     10    1728     1024   95,492,480
llama-200m     32000   768      21     12    2048     1024  197,820,672
llama-300m     32000  1024      18     16    2752     1024  293,245,952
=============  =====  ====  ======  =====  ======  =======  ===========

The two character-level presets (vocabulary 96: printable ASCII plus a few
control characters) are for quick experiments; the others use a 32,000-token
(LLaMA SentencePiece sized) vocabulary. Their shapes are this library's
choice, not taken from the paper: head dim 32 for the two smallest, 64
otherwise, with counts within 2.5 % of the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .utils import count_parameters

__all__ = [
    "LlamaConfig",
    "LLAMA_CONFIGS",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "rotate_half",
    "CausalSelfAttention",
    "SwiGLU",
    "DecoderBlock",
    "Llama",
    "count_parameters",
]


def _default_hidden_dim(dim: int, multiple_of: int) -> int:
    """LLaMA's SwiGLU width: ``8/3 * dim`` rounded up to a multiple of ``multiple_of``."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of :class:`Llama`.

    Attributes:
        vocab_size: number of token ids.
        dim: model width ``D``.
        n_layers: number of decoder blocks.
        n_heads: attention heads; ``dim % n_heads == 0`` and the head dim is even.
        hidden_dim: SwiGLU width; ``None`` means ``8/3 * dim`` rounded up to a
            multiple of ``multiple_of`` (filled in at construction).
        max_seq_len: longest sequence; sizes the rotary cos/sin tables.
        dropout: rate of the ``nn.Dropout`` modules on the embedding output and
            on the outputs of attention and MLP (attention probabilities are not
            dropped).
        norm_eps: RMSNorm epsilon.
        rope_base: rotary base ``b`` in ``theta_i = b^(-2i/d)``.
        tie_embeddings: share one Parameter between ``embed`` and ``lm_head``.
        multiple_of: rounding of the default ``hidden_dim``.
    """

    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    hidden_dim: int | None = None
    max_seq_len: int = 1024
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    multiple_of: int = 32

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.hidden_dim is None:
            object.__setattr__(self, "hidden_dim", _default_hidden_dim(self.dim, self.multiple_of))

    @property
    def head_dim(self) -> int:
        """Width ``D / H`` of one attention head."""
        return self.dim // self.n_heads


#: Named presets; see the table in the module docstring for their parameter counts.
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "llama-1m": LlamaConfig(vocab_size=96, dim=128, n_layers=5, n_heads=4, max_seq_len=256),
    "llama-10m": LlamaConfig(vocab_size=96, dim=384, n_layers=6, n_heads=6, max_seq_len=256),
    "llama-9m": LlamaConfig(vocab_size=32000, dim=128, n_layers=4, n_heads=4),
    "llama-20m": LlamaConfig(vocab_size=32000, dim=256, n_layers=5, n_heads=4),
    "llama-30m": LlamaConfig(vocab_size=32000, dim=320, n_layers=8, n_heads=5),
    "llama-95m": LlamaConfig(vocab_size=32000, dim=640, n_layers=11, n_heads=10),
    "llama-200m": LlamaConfig(vocab_size=32000, dim=768, n_layers=21, n_heads=12),
    "llama-300m": LlamaConfig(vocab_size=32000, dim=1024, n_layers=18, n_heads=16),
}


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` (computed in float32); shape-preserving."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (split in halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x * cos + rotate_half(x) * sin``.

    Shapes: ``x`` ``[..., T, d]``, ``cos``/``sin`` ``[T, d]`` (broadcast) -> ``[..., T, d]``.
    """
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Precomputed rotary tables as non-persistent buffers ``cos``/``sin`` of shape ``[max_seq_len, d]``.

    Entry ``[m, i]`` holds ``cos(m * theta_{i mod d/2})`` with ``theta_j = base^(-2j/d)``.
    ``forward(seq_len)`` returns the first ``seq_len`` rows of both tables,
    cast to ``dtype`` when given. No parameters.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [d/2]
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [T_max, d/2]
        angles = torch.cat([angles, angles], dim=-1)  # [T_max, d]
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.max_seq_len}")
        cos, sin = self.cos[:seq_len], self.sin[:seq_len]
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary q/k and bias-free ``q/k/v/o_proj``.

    Shapes: ``x`` ``[B, T, D]``, ``cos``/``sin`` ``[T, D/H]`` -> ``[B, T, D]``.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q = apply_rotary(self._split_heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(self._split_heads(self.k_proj(x)), cos, sin)
        v = self._split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.resid_drop(self.o_proj(out))


class SwiGLU(nn.Module):
    """``down_proj(SiLU(gate_proj(x)) * up_proj(x))``, bias-free; ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: ``h + attn(attn_norm(h))`` then ``h + mlp(mlp_norm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        assert config.hidden_dim is not None  # filled in by LlamaConfig.__post_init__
        self.mlp = SwiGLU(config.dim, config.hidden_dim, config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """LLaMA-style causal language model; ``forward(idx [B, T]) -> logits [B, T, vocab_size]``.

    Module names: ``embed`` (nn.Embedding), ``layers.{i}.{attn_norm, attn.{q,k,v,o}_proj,
    mlp_norm, mlp.{gate,up,down}_proj}``, ``norm``, ``lm_head`` (nn.Linear); the
    parameter-free ``rotary`` holds the cos/sin tables.

    Initialisation: linear and embedding weights ~ N(0, 0.02^2); the residual
    output projections ``o_proj`` and ``down_proj`` use std ``0.02 / sqrt(2 n_layers)``
    (GPT-2); RMSNorm weights are ones.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.embed_drop = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def boundary_layers(self) -> tuple[str, str]:
        """Names of the token embedding and the output head."""
        return "embed", "lm_head"

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` int64 token ids -> ``[B, T, vocab_size]`` next-token logits."""
        h = self.embed_drop(self.embed(idx))
        cos, sin = self.rotary(idx.shape[1], dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))
