"""A full-rank linear adapter initialised to the identity."""

from __future__ import annotations

import torch
from torch import nn


class LinearAdapter(nn.Module):
    """``y = x W^T + b`` with ``W = I`` and ``b = 0`` at initialisation, so it starts as the identity.

    APEX's text adapter: one d x d linear on the final projected text embedding, no bottleneck, no
    non-linearity and no residual branch (the identity initialisation plays the residual's role).
    ``d * d + d`` parameters (262,656 for d = 512).

    Setting :attr:`enabled` to False makes the module pass its input through (the "unadapted" features
    of APEX's ensemble); :meth:`adapt` applies the linear map whatever :attr:`enabled` says.

    Args:
        width: feature width d.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity weight, zero bias."""
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.linear.in_features))
            self.linear.bias.zero_()

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The adapted features (the linear map, regardless of :attr:`enabled`)."""
        return self.linear(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The adapted features, or the input when disabled."""
        return self.adapt(features) if self.enabled else features

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"enabled={self.enabled}"
