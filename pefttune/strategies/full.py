"""Full fine-tuning: the baseline every parameter-efficient method is measured against."""

from __future__ import annotations

from typing import ClassVar

from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy
from pefttune.towers.base import ImageTower, TextTower


class FullFineTune(AdaptationStrategy):
    """Train every parameter of both towers, both projections and the logit scale.

    Follows the CLIP / open_clip / FLYP recipe (``docs/methods/full.md``): symmetric InfoNCE over the
    global batch, a learnable logit scale initialised from the checkpoint (1/0.07 for towers without one)
    and clamped at 100 after every step, no weight decay on biases, norm gains and the logit scale. The
    recipe's small learning rate (about 1e-5, AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.1, warmup
    then cosine) lives in the shipped configs.
    """

    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=None, learnable=True)

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Unfreeze everything."""
        image_tower.requires_grad_(True)
        text_tower.requires_grad_(True)
