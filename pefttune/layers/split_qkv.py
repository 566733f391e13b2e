"""Fused query/key/value projections rebuilt as separate linears, so each can be adapted on its own.

timm's ViT computes ``q``, ``k`` and ``v`` with one ``nn.Linear(d, 3d)`` whose output features are the three
projections in consecutive thirds. Methods that adapt q, k and v separately (CLIP-LoRA gives each its own
low-rank update) need three modules to attach to. :class:`SplitQKV` holds them and concatenates their
outputs in the same order, so it is a drop-in replacement for the fused linear: the attention module that
calls it reshapes the ``3d`` output into q, k and v exactly as before.

``nn.MultiheadAttention`` (OpenAI CLIP and open_clip blocks) packs the three projections into one
parameter and applies them, and its output projection, functionally: :class:`SplitMultiheadAttention` is
the same attention with four linears called as modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pefttune.towers.base import Tower

QKV_PARTS = ("q", "k", "v")


class SplitQKV(nn.Module):
    """Three linears ``q``, ``k``, ``v`` whose concatenated outputs equal a fused qkv linear's output.

    Build it with :meth:`from_fused`. The weights are copies of the fused weight's row-thirds (and bias
    thirds), so the function is unchanged; only the parameter names differ (``qkv.q.weight`` instead of
    rows of ``qkv.weight``). :meth:`to_fused` rebuilds a plain fused linear, for example after a LoRA update
    has been merged into ``q``, ``k`` and ``v``.

    Args:
        q: the query projection (d_in -> d_q).
        k: the key projection (d_in -> d_k).
        v: the value projection (d_in -> d_v).
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        if not q.in_features == k.in_features == v.in_features:
            raise ValueError(
                f"q, k and v must read the same input width, got {q.in_features}, {k.in_features}, "
                f"{v.in_features}"
            )
        self.q = q
        self.k = k
        self.v = v
        self.in_features = q.in_features
        self.out_features = q.out_features + k.out_features + v.out_features

    @classmethod
    def from_fused(cls, fused: nn.Linear) -> SplitQKV:
        """Split ``fused`` (output features ``[q; k; v]`` in three equal thirds) into three linears.

        The new linears live on the fused weight's device and dtype and copy its values; their
        ``requires_grad`` follows the fused weight's.
        """
        if not isinstance(fused, nn.Linear):
            raise TypeError(f"expected a fused nn.Linear, got {type(fused).__name__}")
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv linear has 3 * d outputs; got {fused.out_features}")
        width = fused.out_features // 3
        weight = fused.weight
        parts = []
        for index in range(3):
            rows = slice(index * width, (index + 1) * width)
            linear = nn.Linear(
                fused.in_features,
                width,
                bias=fused.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(weight[rows])
                if fused.bias is not None:
                    linear.bias.copy_(fused.bias[rows])
            linear.requires_grad_(weight.requires_grad)
            parts.append(linear)
        return cls(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[q(x); k(x); v(x)]`` along the last dimension, the fused linear's output layout."""
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def to_fused(self) -> nn.Linear:
        """A plain fused linear with this module's current q, k and v weights stacked in order.

        If the parts carry unmerged adapters (their weights live under ``base_layer``), the adapters are
        ignored: merge them first to export the adapted function.
        """
        linears = [_plain_linear(getattr(self, name)) for name in QKV_PARTS]
        first = linears[0]
        has_bias = first.bias is not None
        fused = nn.Linear(
            self.in_features,
            self.out_features,
            bias=has_bias,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([linear.weight for linear in linears], dim=0))
            if has_bias:
                fused.bias.copy_(torch.cat([linear.bias for linear in linears], dim=0))
        return fused

    def extra_repr(self) -> str:
        """Widths, as ``nn.Linear`` shows them."""
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _plain_linear(module: nn.Module) -> nn.Linear:
    # An adapter wrapper (peft's LoRA Linear) keeps the original linear as ``base_layer``.
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, nn.Linear):
        raise TypeError(f"expected a linear (or an adapter around one), got {type(base).__name__}")
    return base


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` rebuilt with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linears.

    ``nn.MultiheadAttention`` keeps its query/key/value projection as one packed parameter
    (``in_proj_weight``, ``[3 E, E]``) and applies it and ``out_proj`` functionally, so no module exists
    that a LoRA library (or a forward hook) can wrap. This module holds the row-thirds of the packed weight
    as three linears and calls every projection as a module; it computes the same function (scaled dot
    product attention over ``num_heads`` heads, the same masks, dropout on the attention weights), so it is
    a drop-in replacement inside open_clip's residual blocks (built with :meth:`from_multihead_attention`).

    Differences: attention weights are never returned (the second output is ``None``; open_clip and the
    towers ask for ``need_weights=False``), and only self-attention layouts with equal q/k/v widths, no
    ``add_bias_kv`` and no ``add_zero_attn`` are supported (every CLIP block).

    Args:
        embed_dim: E, the model width.
        num_heads: attention heads (E must divide by it).
        bias: whether the projections have biases.
        dropout: dropout probability on the attention weights (training only).
        batch_first: inputs are [B, L, E] (True) or [L, B, E] (False), as the original module's flag.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead_attention(cls, attention: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """Copy ``attention``'s weights into a new split module (same device, dtype and ``requires_grad``).

        Raises:
            ValueError: for layouts this module does not reproduce (different k/v widths, ``add_bias_kv``,
                ``add_zero_attn``).
        """
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(attention).__name__}")
        if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
            raise ValueError("nn.MultiheadAttention with other key/value widths (kdim/vdim) is not supported")
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        weight = attention.in_proj_weight
        bias = attention.in_proj_bias
        split = cls(
            attention.embed_dim,
            attention.num_heads,
            bias=bias is not None,
            dropout=attention.dropout,
            batch_first=attention.batch_first,
        ).to(device=weight.device, dtype=weight.dtype)
        width = attention.embed_dim
        with torch.no_grad():
            for index, linear in enumerate((split.q_proj, split.k_proj, split.v_proj)):
                rows = slice(index * width, (index + 1) * width)
                linear.weight.copy_(weight[rows])
                if bias is not None:
                    linear.bias.copy_(bias[rows])
                linear.requires_grad_(weight.requires_grad)
            split.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                split.out_proj.bias.copy_(attention.out_proj.bias)
        split.out_proj.requires_grad_(attention.out_proj.weight.requires_grad)
        split.train(attention.training)
        return split

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the current weights (merge adapters first to keep them)."""
        linears = [_plain_linear(getattr(self, name)) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
        first = linears[0]
        attention = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=first.bias is not None,
            batch_first=self.batch_first,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            attention.in_proj_weight.copy_(torch.cat([linear.weight for linear in linears[:3]], dim=0))
            if first.bias is not None:
                attention.in_proj_bias.copy_(torch.cat([linear.bias for linear in linears[:3]], dim=0))
            attention.out_proj.weight.copy_(linears[3].weight)
            if linears[3].bias is not None:
                attention.out_proj.bias.copy_(linears[3].bias)
        return attention

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over ``key``/``value``; returns ``(output, None)`` (no attention weights).

        Masks follow ``nn.MultiheadAttention``: ``attn_mask`` is [L, S] or [B * heads, L, S], boolean (True
        masks a position out) or additive float; ``key_padding_mask`` is [B, S], boolean (True ignores the
        key) or additive float.
        """
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        source = key.shape[1]
        heads, width = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, length, heads, width).transpose(1, 2)
        k = self.k_proj(key).view(batch, source, heads, width).transpose(1, 2)
        v = self.v_proj(value).view(batch, source, heads, width).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, q.dtype)
        output = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        output = self.out_proj(output.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, None

    def extra_repr(self) -> str:
        """Width and heads."""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """One additive mask [B or 1, heads or 1, L, S] from ``nn.MultiheadAttention``'s two mask arguments."""
    mask: torch.Tensor | None = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
        mask = mask.view(batch, heads, length, source) if mask.ndim == 3 else mask.view(1, 1, length, source)
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_multihead_attention(root: nn.Module, names: list[str]) -> int:
    """Replace the ``nn.MultiheadAttention`` modules at ``names`` (relative to ``root``) by split ones.

    Returns:
        How many modules were replaced (names already split are skipped).
    """
    replaced = 0
    for name in names:
        module = root.get_submodule(name)
        if isinstance(module, SplitMultiheadAttention):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, SplitMultiheadAttention.from_multihead_attention(module))
        replaced += 1
    return replaced


def split_packed_attention(tower: Tower) -> int:
    """Replace every packed ``nn.MultiheadAttention`` a tower's blocks report by a split one.

    The function of the tower is unchanged; afterwards its blocks report q, k, v and output linears that are
    called as modules (so LoRA can wrap them and hooks on them fire). The frozen weights move from
    ``attn.in_proj_weight`` to ``attn.{q,k,v}_proj.weight``.

    Returns:
        How many attentions were replaced.
    """
    names = [block.qkv.names[0] for block in tower.blocks() if block.qkv is not None and block.qkv.is_packed]
    replaced = split_multihead_attention(tower, names)
    if replaced:
        tower.refresh_blocks()
    return replaced
