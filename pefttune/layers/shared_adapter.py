"""Bottleneck adapters whose up-projection is partly shared with an adapter in another tower.

The Cross-Modal Adapter (Jiang et al., Pattern Recognition 2024; arXiv 2211.09623) inserts
``A(h) = h + Up(act(Down(h)))`` into both towers of a dual encoder. ``Down`` and most rows of ``Up`` belong
to one tower; the *last* ``d_s`` output rows of ``Up`` (weight and bias) come from a
:class:`SharedUpProjection` that one adapter of the image tower and one adapter of the text tower use
together.

Ownership of the shared rows: a :class:`SharedUpProjection` is registered in exactly one place (the
strategy holds them; see :class:`~pefttune.strategies.cross_modal_adapter.CrossModalAdapter`). An adapter
keeps a plain, *unregistered* reference to it, so the shared tensors appear once in ``named_parameters()``
and ``state_dict()`` and an optimizer or DDP never sees them twice. The adapter reads the shared
parameters at forward time, so moving or casting the model that registers them is enough.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pefttune.layers.hooks import channels_last_apply


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation element-wise."""
        return x * torch.sigmoid(1.702 * x)


def init_adapter_weight(weight: torch.Tensor, std: float) -> None:
    """Draw adapter weights from the truncated normal of the reference code.

    The cut-off stays at torch's default of +-2 in absolute units, as in the official implementation; with
    ``std = 0.01`` that is +-200 standard deviations, so the draw is effectively ``N(0, std^2)``. Cutting at
    +-2 std instead would shrink the effective std by about 12%, and the authors report that a smaller
    std slows training.
    """
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0, b=2.0)


class SharedUpProjection(nn.Module):
    """The ``d_s`` up-projection rows (``W: [d_s, r]``, ``b: [d_s]``) that two adapters share.

    Args:
        bottleneck: the adapters' bottleneck width ``r``.
        shared_dim: the number of shared output channels ``d_s``.
        init_std: std of the weight initialisation (biases start at zero).
    """

    def __init__(self, bottleneck: int, shared_dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if bottleneck < 1 or shared_dim < 1:
            raise ValueError(f"bottleneck and shared_dim must be >= 1, got {bottleneck} and {shared_dim}")
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(shared_dim, bottleneck))
        self.bias = nn.Parameter(torch.empty(shared_dim))
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        """The bottleneck width ``r``."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """The number of shared channels ``d_s``."""
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        """Truncated-normal weights, zero bias (not zero-init: the adapters start slightly perturbed)."""
        init_adapter_weight(self.weight, self.init_std)
        nn.init.zeros_(self.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Project bottleneck activations ``[..., r]`` to the shared channels ``[..., d_s]``."""
        return F.linear(z, self.weight, self.bias)

    def extra_repr(self) -> str:
        """Sizes, for ``print(model)``."""
        return f"bottleneck={self.in_features}, shared_dim={self.out_features}"


class SharedUpAdapter(nn.Module):
    """``A(h) = h + Up(act(Down(h)))`` with ``Up = [Up_unique; Up_shared]`` over the channel dimension.

    ``Down: width -> r`` and ``Up_unique: r -> width - d_s`` belong to this adapter; ``Up_shared: r -> d_s``
    (optional) is a :class:`SharedUpProjection` owned elsewhere and used by reference. Its channels are
    concatenated *after* the unique ones, so they are the last ``d_s`` channels of the update. Without a
    shared projection the adapter is an ordinary uni-modal bottleneck adapter. No normalisation and no
    dropout inside the adapter; every weight starts truncated-normal with ``init_std``, biases at zero.

    Args:
        width: channels of the hidden states (D of tokens [B, N, D], C of feature maps [B, C, H, W]).
        bottleneck: ``r``.
        shared: the shared up-projection rows, or ``None``.
        init_std: std of the weight initialisation.
        layout: ``"tokens"`` (channels last) or ``"map"`` (channels first: applied position-wise over C).

    Raises:
        ValueError: when ``shared`` leaves no unique channel (``width <= d_s``) or its bottleneck differs.
    """

    def __init__(
        self,
        width: int,
        bottleneck: int = 8,
        shared: SharedUpProjection | None = None,
        init_std: float = 0.01,
        layout: Literal["tokens", "map"] = "tokens",
    ) -> None:
        super().__init__()
        if layout not in ("tokens", "map"):
            raise ValueError(f"layout must be 'tokens' or 'map', got {layout!r}")
        shared_dim = shared.out_features if shared is not None else 0
        if shared is not None and shared.in_features != bottleneck:
            raise ValueError(f"shared projection has bottleneck {shared.in_features}, adapter {bottleneck}")
        if width <= shared_dim:
            raise ValueError(f"width {width} leaves no unique channel next to {shared_dim} shared ones")
        self.width = width
        self.bottleneck = bottleneck
        self.layout = layout
        self.init_std = init_std
        self.down = nn.Linear(width, bottleneck)
        self.act = QuickGELU()
        self.up_unique = nn.Linear(bottleneck, width - shared_dim)
        # Stored in __dict__ so nn.Module does not register it: its owner registers it once.
        self.__dict__["_shared"] = shared
        self.reset_parameters()

    @property
    def shared(self) -> SharedUpProjection | None:
        """The shared up-projection rows used by reference (not a submodule of this adapter)."""
        return self.__dict__["_shared"]

    @property
    def shared_dim(self) -> int:
        """``d_s`` (0 without sharing)."""
        return self.shared.out_features if self.shared is not None else 0

    def reset_parameters(self) -> None:
        """Re-draw this adapter's own weights (the shared rows are reset by their owner)."""
        for linear in (self.down, self.up_unique):
            init_adapter_weight(linear.weight, self.init_std)
            nn.init.zeros_(linear.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter's update ``Up(act(Down(h)))`` for channels-last hidden states ``[..., width]``."""
        z = self.act(self.down(h))
        update = self.up_unique(z)
        if self.shared is not None:
            update = torch.cat([update, self.shared(z)], dim=-1)
        return update

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h + delta(h)``, over the last dimension (tokens) or the channel dimension (maps)."""
        if self.layout == "map":
            return h + channels_last_apply(self.delta, h)
        return h + self.delta(h)

    def extra_repr(self) -> str:
        """Sizes and layout, for ``print(model)``; ``shared_dim`` counts the rows used by reference."""
        return (
            f"width={self.width}, bottleneck={self.bottleneck}, shared_dim={self.shared_dim}, "
            f"layout={self.layout}"
        )
