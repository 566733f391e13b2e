"""A fused query/key/value linear rebuilt as three linears, so each projection can be adapted on its own.

timm's ViT computes ``q``, ``k`` and ``v`` with one ``nn.Linear(d, 3d)`` whose output features are the three
projections in consecutive thirds. Methods that adapt q, k and v separately (CLIP-LoRA gives each its own
low-rank update) need three modules to attach to. :class:`SplitQKV` holds them and concatenates their
outputs in the same order, so it is a drop-in replacement for the fused linear: the attention module that
calls it reshapes the ``3d`` output into q, k and v exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

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
