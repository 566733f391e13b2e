"""LiT: locked-image text tuning (Zhai et al., CVPR 2022)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy, reset_parameters
from pefttune.towers.base import ImageTower, TextTower


class LiT(AdaptationStrategy):
    """LiT: lock the whole image tower and train the text tower.

    Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022.

    * The image tower, its projection included, is frozen, kept in eval mode (no dropout, stochastic depth
      or BatchNorm updates) and run under ``torch.no_grad`` (see :meth:`Tower.lock`). Configure the image
      tower with ``embed_dim: null`` to use its pooled features directly, as LiT's improved models do, and
      give the text tower a projection to the image feature width.
    * The text tower trains from its pretrained weights (``text_init="pretrained"``, LiT's "LU") or from
      scratch (``"scratch"``, "Lu"; DueT's LiT baseline).
    * Learnable temperature starting at scale 10 (``log 10``), not CLIP's 1/0.07.

    Because the locked tower is deterministic, :class:`~pefttune.module.DualEncoderModule` computes each
    training image's features once and reuses them when the training transform has no augmentation.

    Args:
        text_init: ``pretrained`` or ``scratch``.
        **kwargs: see :class:`AdaptationStrategy`.
    """

    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=10.0, learnable=True)
    # The whole text tower trains and is in the checkpoint: where it started does not matter on loading.
    init_only_arguments: ClassVar[tuple[str, ...]] = ("text_init",)

    def __init__(self, text_init: Literal["pretrained", "scratch"] = "pretrained", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if text_init not in ("pretrained", "scratch"):
            raise ValueError(f"text_init must be 'pretrained' or 'scratch', got {text_init!r}")
        self.text_init = text_init

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Lock the image tower; unfreeze (and optionally re-initialise) the text tower."""
        image_tower.lock()
        if self.text_init == "scratch":
            reset_parameters(text_tower.model)
        text_tower.requires_grad_(True)
