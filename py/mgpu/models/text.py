"""Text towers: OpenAI CLIP's text transformer and BERT, with module names that follow the published
checkpoints (OpenAI/open_clip ``transformer.resblocks.N``; Hugging Face ``encoder.layer.N``), so their
weights map onto these modules key for key.

The CLIP tower's MLP activation is part of its definition (``ClipTextSpec.activation``): QuickGELU for
OpenAI's weights (and open_clip's ``-quickgelu`` ones), GELU for open_clip's own ``ViT-B-32`` (LAION-2B,
DataComp); the encoder names say which (``clip:ViT-B/32``, ``clip:ViT-B/32-gelu``). Both towers can
recompute their blocks in the backward pass instead of keeping activations
(``set_grad_checkpointing``): same outputs and gradients, less memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class ClipTextSpec:
    width: int
    layers: int
    heads: int
    context: int = 77
    vocab: int = 49408
    dropout: float = 0.0
    activation: str = "quick_gelu"  # the MLP's: "quick_gelu" (OpenAI's weights) or "gelu" (open_clip's own)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLIP text activation {self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor, recompute: bool) -> torch.Tensor:
    """x through each block; with recompute, each block's activations are recomputed in the backward
    pass instead of kept (torch.utils.checkpoint, non-reentrant: the RNG state is replayed, so dropout
    draws the same masks and outputs and gradients are those of the plain run)."""
    for block in blocks:
        x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
    return x


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, dropout: float, activation: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", ACTIVATIONS[activation]())  # the name OpenAI's checkpoints use, whichever it is
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, dropout: float, activation: str = "quick_gelu"):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, dropout, activation)
                                       for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        return _run_blocks(self.resblocks, x, mask, recompute)


class ClipTextTower(nn.Module):
    """CLIP's text encoder without its projection: token ids (B, context) -> features (B, width), read
    at the end token (the largest id in each row, as OpenAI's tokenizer numbers it)."""

    def __init__(self, spec: ClipTextSpec):
        super().__init__()
        self.spec = spec
        self.out_dim = spec.width
        self.token_embedding = nn.Embedding(spec.vocab, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context, spec.width))
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.dropout, spec.activation)
        self.ln_final = nn.LayerNorm(spec.width)
        self.register_buffer("causal_mask", torch.full((spec.context, spec.context), float("-inf")).triu(1),
                             persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass while training (less memory, same gradients)."""
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if n > self.spec.context:
            raise ValueError(f"text of {n} tokens is longer than the context of {self.spec.context}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, self.causal_mask[:n, :n]))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


@dataclass(frozen=True)
class BertSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 21128
    max_positions: int = 512
    type_vocab: int = 2
    dropout: float = 0.1
    # "pooler": Hugging Face's BertModel pooler_output (dense + tanh over [CLS]), right for pretrained
    # weights; "mean": the mean of the hidden states of the non-padding tokens (open_clip's mean pooler),
    # which learns far faster from scratch (docs/training.md); "cls": the [CLS] hidden state (Chinese-CLIP).
    pooling: str = "pooler"
    init: str = "bert"  # "bert": normal, std 0.02 (Hugging Face); "torch": PyTorch's own (better from scratch)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"BertSpec pooling {self.pooling!r}: allowed {', '.join(POOLINGS)}")
        if self.init not in ("bert", "torch"):
            raise ValueError(f"BertSpec init {self.init!r}: allowed bert, torch")


POOLINGS = ("pooler", "mean", "cls")


class BertEmbeddings(nn.Module):
    def __init__(self, s: BertSpec):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab, s.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(s.max_positions, s.hidden)
        self.token_type_embeddings = nn.Embedding(s.type_vocab, s.hidden)
        self.LayerNorm = nn.LayerNorm(s.hidden, eps=1e-12)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, s: BertSpec):
        super().__init__()
        self.heads = s.heads
        self.query = nn.Linear(s.hidden, s.hidden)
        self.key = nn.Linear(s.hidden, s.hidden)
        self.value = nn.Linear(s.hidden, s.hidden)
        self.dropout_p = s.dropout

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=pad_mask,
            dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)


class BertLayer(nn.Module):
    """Post-LN encoder layer in Hugging Face's layout (attention.self / attention.output / intermediate / output)."""

    def __init__(self, s: BertSpec):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(s)
        self.attention.output = self._dense_ln(s.hidden, s.hidden, s)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(s.hidden, s.intermediate)
        self.output = self._dense_ln(s.intermediate, s.hidden, s)

    @staticmethod
    def _dense_ln(c_in: int, c_out: int, s: BertSpec) -> nn.Module:
        m = nn.Module()
        m.dense = nn.Linear(c_in, c_out)
        m.LayerNorm = nn.LayerNorm(c_out, eps=1e-12)
        m.dropout = nn.Dropout(s.dropout)
        return m

    @staticmethod
    def _add_norm(m: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return m.LayerNorm(m.dropout(m.dense(h)) + residual)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = self._add_norm(self.attention.output, self.attention.self(x, pad_mask), x)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self._add_norm(self.output, h, x)


class BertTower(nn.Module):
    """BERT: token ids (B, n), padding id 0 -> one feature (B, hidden): by default BertModel's pooler_output
    (dense + tanh over the first token); with spec.pooling "mean" or "cls", no pooler (see BertSpec)."""

    def __init__(self, spec: BertSpec):
        super().__init__()
        self.spec = spec
        self.out_dim = spec.hidden
        self.embeddings = BertEmbeddings(spec)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(spec) for _ in range(spec.layers))
        if spec.pooling == "pooler":
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(spec.hidden, spec.hidden)
        self.grad_checkpointing = False
        if spec.init == "bert":
            self.apply(self._init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass while training (less memory, same gradients)."""
        self.grad_checkpointing = enable

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.spec.max_positions:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than BERT's {self.spec.max_positions} positions")
        pad_mask = (ids != 0)[:, None, None, :]  # True = attend
        x = self.embeddings(ids)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = _run_blocks(self.encoder.layer, x, pad_mask, recompute)
        if self.spec.pooling == "mean":
            keep = (ids != 0).unsqueeze(-1).to(x.dtype)
            return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        if self.spec.pooling == "cls":
            return x[:, 0]
        return torch.tanh(self.pooler.dense(x[:, 0]))
