"""DueT: dual-adapter tuning of uni-modal towers (Hasegawa, Nishida, Maeda, Saito; EMNLP 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pefttune.layers.frozen_batchnorm import freeze_batchnorm_statistics
from pefttune.layers.gated_adapter import GATES, Gate, GatedAdapterUnit
from pefttune.layers.hooks import add_output_transform
from pefttune.strategies.base import (
    AdaptationStrategy,
    TemperaturePolicy,
    unfreeze_norms,
    unfreeze_projection,
)
from pefttune.towers.base import BlockInfo, ImageTower, TextTower

if TYPE_CHECKING:
    from pefttune.losses import ContrastiveLoss

LayerSelection = str | list[int]
UnitNorm = Literal["auto", "pre", "post"]

UNIT_NAME = "duet_gau"


class DueT(AdaptationStrategy):
    """DueT: a gated adapter unit after every block of both towers; units, norms and heads train.

    Hasegawa, Nishida, Maeda, Saito, "DueT: Image-Text Contrastive Transfer Learning with
    Dual-adapter Tuning", EMNLP 2023. Specification: ``docs/methods/duet.md``.

    * **Units.** A :class:`~pefttune.layers.gated_adapter.GatedAdapterUnit` on the output of each selected
      block (after the block's last residual add; its output replaces the block output), in both towers:
      ``alpha * FFN(LN(H)) + (1 - alpha) * H`` with ``FFN = Linear(d, m) -> GELU -> Linear(m, d)`` and a raw
      learnable scalar ``alpha`` per unit initialised to 0.02. On post-LN towers (BERT, MiniLM) the unit's
      LayerNorm follows its FFN, ``alpha * LN(FFN(H)) + (1 - alpha) * H``, so that ``alpha = 0`` still
      gives the pretrained tower. FFN weights start from N(0, 0.02), biases from 0 (the paper does not say).
    * **What trains.** The units (``duet_`` parameters, group ``method``), the affine parameters of every
      normalisation layer of both backbones (group ``backbone``) and both projection heads (``head``).
      Attention, MLP, convolution and embedding weights stay frozen.
    * **Loss and temperature.** The UniCL-style multi-positive loss (pairs sharing an image or a caption
      are positives), summed over both directions, at a fixed temperature of 1/64.
    * **Defaults.** m = 3072 (the paper's main results), every block of both towers, the scalar gate at
      0.02, learned. The paper trains with AdamW at 5e-4 (the shipped configs).

    Deviation on convolutional towers (the offline default's EfficientNet-Lite0): a block's output is a
    feature map [B, C, H, W], and the unit acts at every position over the channel dimension (a 1x1
    adapter) with a pre-FFN LayerNorm over channels. The backbone's norms there are BatchNorms: their
    affine parameters train, as the analogue of DueT's trainable LayerNorms, but their running statistics
    stay frozen (``freeze_norm_statistics``, on by default): every BatchNorm normalises with its
    pretrained statistics in training as in evaluation, so the body stays the fixed function DueT assumes
    and ``alpha = 0`` gives the pretrained tower in both modes. Towers without BatchNorm are unaffected.

    Args:
        width: m, the inner width of every unit's FFN (the paper studies 96 to 3072).
        image_layers: image blocks that get a unit: ``"all"``, ``"none"``, ``"last:N"`` (the last N blocks;
            the paper's "4-12" and "8-12" on 12 layers are ``"last:9"`` and ``"last:5"``) or a list of
            0-based block indices (negative ones count from the end).
        text_layers: likewise for the text tower.
        gate: ``scalar`` (DueT), ``sentence`` or ``token`` (sigmoid gates of the paper's Appendix D: from
            the first token, or a feature map's spatial mean; per token or position) or ``none`` (g = 1).
        alpha_init: initial gate value (scalar gate; the sigmoid gates start there too).
        learn_alpha: whether the scalar gate learns (the paper's ablation fixes it at 0.02).
        unit_norm: where each unit's LayerNorm goes: ``auto`` follows the block (``post`` for post-LN
            blocks, ``pre`` for pre-LN blocks and feature maps), or force ``pre`` / ``post``.
        init_std: standard deviation of the units' FFN weight initialisation.
        freeze_norm_statistics: keep the backbones' BatchNorm layers on their running statistics.
        image_identity: which batch items are the same image in the default multi-positive loss: ``id``
            (the data set's image ids, DueT) or ``content`` (byte-identical files, from the batch's
            ``image_hashes``; web data repeats images under different ids).
        **kwargs: see :class:`AdaptationStrategy` (``temperature``, ``group_lr``, ...).
    """

    prefix: ClassVar[str] = "duet_"
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=64.0, learnable=False)
    # Adapter checkpoints must match the rest: they refuse units that compute otherwise with tensors of
    # the same shapes (sentence vs token gate, pre- vs post-FFN LayerNorm).
    init_only_arguments: ClassVar[tuple[str, ...]] = (
        "alpha_init",
        "init_std",
        "freeze_norm_statistics",
        "image_identity",  # training only: which batch items are positives
    )

    def __init__(
        self,
        width: int = 3072,
        image_layers: LayerSelection = "all",
        text_layers: LayerSelection = "all",
        gate: Gate = "scalar",
        alpha_init: float = 0.02,
        learn_alpha: bool = True,
        unit_norm: UnitNorm = "auto",
        init_std: float = 0.02,
        freeze_norm_statistics: bool = True,
        image_identity: Literal["id", "content"] = "id",
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if unit_norm not in ("auto", "pre", "post"):
            raise ValueError(f"unit_norm must be 'auto', 'pre' or 'post', got {unit_norm!r}")
        for selection in (image_layers, text_layers):
            _check_selection(selection)
        if image_identity not in ("id", "content"):
            raise ValueError(f"image_identity must be 'id' or 'content', got {image_identity!r}")
        self.image_identity = image_identity
        self.width = width
        self.image_layers = image_layers
        self.text_layers = text_layers
        self.gate = gate
        self.alpha_init = alpha_init
        self.learn_alpha = learn_alpha
        self.unit_norm = unit_norm
        self.init_std = init_std
        self.freeze_norm_statistics = freeze_norm_statistics

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Unfreeze both backbones' norms and both heads, then add a unit after each selected block."""
        for tower, selection in ((image_tower, self.image_layers), (text_tower, self.text_layers)):
            # Norms first: the units' own LayerNorms are not part of the backbone.
            unfreeze_norms(tower)
            if self.freeze_norm_statistics:
                freeze_batchnorm_statistics(tower.model)
            unfreeze_projection(tower)
            for block in select_blocks(tower.blocks(), selection):
                add_output_transform(block.module, UNIT_NAME, self.unit_for(block))

    def unit_for(self, block: BlockInfo) -> GatedAdapterUnit:
        """A new unit shaped for ``block``'s output."""
        norm = self.unit_norm
        if norm == "auto":
            norm = "post" if block.norm_position == "post" else "pre"
        return GatedAdapterUnit(
            width=block.width,
            hidden=self.width,
            norm=norm,
            gate=self.gate,
            alpha_init=self.alpha_init,
            learn_alpha=self.learn_alpha,
            layout=block.layout,
            init_std=self.init_std,
        )

    def default_loss(self) -> ContrastiveLoss:
        """The multi-positive contrastive loss, summed over both directions (DueT Eq. 3-4)."""
        from pefttune.losses import MultiPositiveInfoNCELoss

        return MultiPositiveInfoNCELoss(reduction_over_directions="sum", image_identity=self.image_identity)


def select_blocks(blocks: list[BlockInfo], selection: LayerSelection) -> list[BlockInfo]:
    """The blocks named by ``selection`` (see :class:`DueT`'s ``image_layers``), in tower order.

    Raises:
        ValueError: for an unknown form, a non-positive ``last:N`` or an index outside the tower.
    """
    _check_selection(selection)
    count = len(blocks)
    if isinstance(selection, str):
        if selection == "all":
            return list(blocks)
        if selection == "none":
            return []
        last = int(selection.removeprefix("last:"))
        return list(blocks[max(count - last, 0) :])
    chosen: set[int] = set()
    for index in selection:
        if not -count <= index < count:
            raise ValueError(f"block index {index} is outside a tower of {count} blocks")
        chosen.add(index % count)
    return [block for block in blocks if block.index in chosen]


def _check_selection(selection: LayerSelection) -> None:
    if isinstance(selection, str):
        if selection in ("all", "none"):
            return
        head, _, number = selection.partition(":")
        if head == "last" and number.isdigit() and int(number) > 0:
            return
        raise ValueError(
            f"layer selection must be 'all', 'none', 'last:N' (N > 0) or a list, got {selection!r}"
        )
    if not all(isinstance(index, int) and not isinstance(index, bool) for index in selection):
        raise ValueError(f"a layer selection list holds block indices (ints), got {selection!r}")
