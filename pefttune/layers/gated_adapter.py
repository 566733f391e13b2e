"""DueT's gated adapter unit (GAU): a gated, serial adapter on a block's output.

Hasegawa, Nishida, Maeda, Saito, "DueT: Image-Text Contrastive Transfer Learning with Dual-adapter
Tuning", EMNLP 2023 (the module as described in the authors' NLP2023 precursor, Eq. 1-2 and
Appendix D)::

    GAU(H) = g * FFN(LN(H)) + (1 - g) * H        pre-LN towers (ViT, CLIP) and feature maps
    GAU(H) = g * LN(FFN(H)) + (1 - g) * H        post-LN towers (BERT)
    FFN(h) = GELU(h W_down + b_down) W_up + b_up,   W_down: d x m, W_up: m x d

The gate ``g`` is a convex-mixing weight, not a residual scale: with ``g = 0`` the unit returns its input
unchanged, so a tower whose every unit has ``g = 0`` is the pretrained tower.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

Gate = Literal["scalar", "sentence", "token", "none"]
NormPlacement = Literal["pre", "post"]
Layout = Literal["tokens", "map"]

GATES: tuple[str, ...] = ("scalar", "sentence", "token", "none")


class GatedAdapterUnit(nn.Module):
    """One gated adapter unit (GAU) over hidden states of width ``width``.

    Gates (``gate``):

    * ``scalar`` (DueT's default): one raw scalar ``alpha`` per unit, no squashing, initialised to
      ``alpha_init`` and learned unless ``learn_alpha`` is False (then it is a buffer).
    * ``sentence``: ``g = sigmoid(h w + b)`` with ``h`` the first token of the unit's input (the [CLS]
      position) or, on a feature map, its spatial mean; one gate per example (Appendix D, ``FFN_sent``).
    * ``token``: ``g = sigmoid(H w + b)``, one gate per token or per feature-map position (``FFN_token``).
    * ``none``: no gate, ``g = 1``: the unit's output replaces the block output (the paper's "gate none").

    The paper does not say how the sigmoid gates start; ``w = 0`` and ``b = logit(alpha_init)`` make them
    start at ``alpha_init`` everywhere, like the scalar gate.

    Args:
        width: d, the width of the hidden states (channels of a feature map).
        hidden: m, the FFN's inner width (an expansion when larger than ``width``, as DueT's 3072).
        norm: ``pre`` applies the unit's LayerNorm before the FFN, ``post`` after it (post-LN towers).
        gate: the gate type (above).
        alpha_init: initial gate value (DueT: 0.02).
        learn_alpha: whether the scalar gate learns.
        layout: ``tokens`` for [B, N, D] inputs, ``map`` for [B, C, H, W] feature maps (the unit then acts
            at every position over the channel dimension).
        init_std: standard deviation of the normal initialisation of the FFN weights (biases start at 0).
        eps: the LayerNorm epsilon.
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        norm: NormPlacement = "pre",
        gate: Gate = "scalar",
        alpha_init: float = 0.02,
        learn_alpha: bool = True,
        layout: Layout = "tokens",
        init_std: float = 0.02,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if width <= 0 or hidden <= 0:
            raise ValueError(f"width and hidden must be positive, got width={width}, hidden={hidden}")
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if layout not in ("tokens", "map"):
            raise ValueError(f"layout must be 'tokens' or 'map', got {layout!r}")
        if gate in ("sentence", "token") and not 0.0 < alpha_init < 1.0:
            raise ValueError(f"a sigmoid gate starts strictly between 0 and 1; got alpha_init={alpha_init}")
        self.width = width
        self.hidden = hidden
        self.norm_placement = norm
        self.gate_type = gate
        self.layout = layout
        self.norm = nn.LayerNorm(width, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        for linear in (self.ffn[0], self.ffn[2]):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        self.gate: nn.Linear | None = None
        if gate == "scalar":
            alpha = torch.tensor(float(alpha_init))
            if learn_alpha:
                self.alpha = nn.Parameter(alpha)
            else:
                self.register_buffer("alpha", alpha)
        elif gate in ("sentence", "token"):
            self.gate = nn.Linear(width, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, math.log(alpha_init / (1.0 - alpha_init)))

    def extra_repr(self) -> str:
        """Show the unit's configuration."""
        return (
            f"width={self.width}, hidden={self.hidden}, norm={self.norm_placement!r}, "
            f"gate={self.gate_type!r}, layout={self.layout!r}"
        )

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adapter branch over the last dimension: ``FFN(LN(h))`` (pre) or ``LN(FFN(h))`` (post)."""
        if self.norm_placement == "pre":
            return self.ffn(self.norm(hidden))
        return self.norm(self.ffn(hidden))

    def gate_value(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gate for channels-last hidden states [B, ..., D], broadcastable against them."""
        if self.gate_type == "scalar":
            return self.alpha
        if self.gate is None:
            return hidden.new_ones(())
        if self.gate_type == "token":
            return torch.sigmoid(self.gate(hidden))
        # Sentence gate: the first token, or the spatial mean of a feature map, decides for the example.
        pooled = hidden.flatten(1, -2).mean(1) if self.layout == "map" else hidden[:, 0]
        gate = torch.sigmoid(self.gate(pooled))
        return gate.view(gate.shape[0], *([1] * (hidden.ndim - 1)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mix the adapter branch into ``hidden`` ([B, N, D] tokens or [B, C, H, W] map)."""
        if self.layout == "map":
            if hidden.ndim != 4:
                raise ValueError(f"a map unit expects [B, C, H, W], got shape {tuple(hidden.shape)}")
            mixed = self._mix(hidden.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            # Hand the next convolution the memory layout it received, so alpha = 0 is bit-exact.
            return mixed.contiguous(memory_format=_memory_format(hidden))
        return self._mix(hidden)

    def _mix(self, hidden: torch.Tensor) -> torch.Tensor:
        adapted = self.transform(hidden)
        if self.gate_type == "none":
            return adapted.to(hidden.dtype)
        gate = self.gate_value(hidden)
        return (gate * adapted + (1 - gate) * hidden).to(hidden.dtype)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    if not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def gated_adapter_units(module: nn.Module) -> Iterator[tuple[str, GatedAdapterUnit]]:
    """Every :class:`GatedAdapterUnit` inside ``module``, with its name relative to ``module``."""
    return ((n, m) for n, m in module.named_modules() if isinstance(m, GatedAdapterUnit))
