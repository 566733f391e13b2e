"""BitFit as a pefttune strategy: the worked example of docs/custom_strategy.md.

Run it from the repository root, where ``examples`` is importable::

    PYTHONPATH=. pefttune fit --config examples/bitfit.yaml
    python -m pefttune.cli fit --config examples/bitfit.yaml  # -m puts the working folder on sys.path
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy, unfreeze_projection
from pefttune.towers.base import ImageTower, TextTower, Tower

__all__ = ["BitFit", "unfreeze_biases"]


def unfreeze_biases(tower: Tower, include_norms: bool = True) -> int:
    """Make every bias of the tower's backbone trainable; returns how many scalars that is.

    Args:
        tower: The tower whose ``model`` (the pretrained body, not the projection) is searched.
        include_norms: Also train the additive part (beta) of normalisation layers, as BitFit does.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    count = 0
    for module in tower.model.modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if not include_norms and isinstance(module, norm_types):
            continue
        bias.requires_grad_(True)
        count += bias.numel()
    return count


class BitFit(AdaptationStrategy):
    """BitFit: train only the bias terms of both towers (plus the new projection heads and temperature).

    Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
    Masked Language-models", ACL 2022. The paper tunes a text encoder for classification; here it is
    applied to both towers of a dual encoder, trained contrastively.

    * **What trains.** Every ``bias`` of both backbones (attention, MLP, convolution and, with
      ``include_norm_biases``, normalisation betas); the projection heads, which are new (random) on
      uni-modal towers and must train for the two embedding spaces to meet; the logit scale.
    * **Groups.** BitFit adds no module, so ``prefix`` is empty and the ``method`` group is empty: the
      biases are existing backbone parameters and count as ``backbone``, the heads as ``head``. An
      adapter-only checkpoint of BitFit is therefore the trainable parameters themselves
      (:meth:`AdaptationStrategy.adapter_state_keys` keeps every trainable parameter).
    * **Temperature.** Learnable, CLIP's start 1/0.07 (or a CLIP checkpoint's own), clamped at 100.
    * **Deviation.** The paper trains the task head and biases of one encoder; training two new projection
      heads is what any method needs here to join two uni-modal towers.

    Args:
        include_norm_biases: Train normalisation layers' betas too (the paper does: they are bias terms).
        train_heads: Train the projection heads. Set it False only for towers already aligned (CLIP).
        **kwargs: See :class:`~pefttune.strategies.base.AdaptationStrategy` (``temperature``, ``group_lr``).
    """

    prefix: ClassVar[str] = ""
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=None, learnable=True)

    def __init__(self, include_norm_biases: bool = True, train_heads: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.include_norm_biases = include_norm_biases
        self.train_heads = train_heads

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Unfreeze the biases of both backbones and, by default, both projection heads."""
        for tower in (image_tower, text_tower):
            if unfreeze_biases(tower, self.include_norm_biases) == 0:
                raise ValueError(f"{type(tower).__name__} has no bias to train: BitFit does not apply to it")
            if self.train_heads:
                unfreeze_projection(tower)
