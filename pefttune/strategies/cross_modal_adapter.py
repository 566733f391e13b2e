"""Cross-Modal Adapter: adapters in both towers whose up-projections partly share weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from pefttune.layers.frozen_batchnorm import freeze_batchnorm_statistics
from pefttune.layers.hooks import add_output_transform
from pefttune.layers.shared_adapter import SharedUpAdapter, SharedUpProjection
from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy, unfreeze_projection
from pefttune.towers.base import ImageTower, TextTower, Tower

Position = Literal["attn", "mlp", "out"]


@dataclass(frozen=True)
class AdapterSite:
    """Where one adapter sits: a block of a tower and a position in it.

    Attributes:
        block: the block index in its tower.
        position: ``attn`` (attention output), ``mlp`` (MLP output) or ``out`` (block output, for blocks
            without attention/MLP sub-layers such as convolutional blocks).
        width: channels of the hidden states there.
        host: the module whose output the adapter transforms.
        layout: ``tokens`` or ``map``.
    """

    block: int
    position: Position
    width: int
    host: nn.Module
    layout: Literal["tokens", "map"]

    @property
    def attribute(self) -> str:
        """The adapter's attribute name on its host (carries the ``cma_`` prefix)."""
        return f"cma_adapter_{self.position}"


@dataclass(frozen=True)
class SharedSlot:
    """One shared up-projection and the two adapter sites that use it.

    Attributes:
        index: the pair index (the block index of the shallower tower; the block index for equal depths).
        key: the position key under ``cma_shared_up[index]`` (``attn``, ``mlp``, or e.g. ``out_mlp`` when a
            convolutional block pairs with a transformer block).
        image_site: the image tower's adapter site.
        text_site: the text tower's adapter site.
    """

    index: int
    key: str
    image_site: AdapterSite
    text_site: AdapterSite


def pair_blocks(num_image_blocks: int, num_text_blocks: int) -> list[tuple[int, int]]:
    """Pair the blocks of two towers for weight sharing, one to one, by relative depth.

    Each block ``i`` of the shallower tower (``S`` blocks) pairs with block ``(i + 1) * L // S - 1`` of the
    deeper one (``L`` blocks): the same relative depth counted from the output side, rounded down. Equal
    depths pair block ``i`` with block ``i`` (the paper's index-aligned sharing). With unequal depths the
    last blocks always pair (they shape the embeddings most) and ``L - S`` blocks of the deeper tower stay
    unpaired; a 24-block ViT-L/14 against a 12-block text tower pairs text block ``i`` with image block
    ``2i + 1``.

    Returns:
        ``(image_block, text_block)`` pairs, in increasing order.
    """
    if num_image_blocks < 1 or num_text_blocks < 1:
        raise ValueError(f"both towers need blocks, got {num_image_blocks} and {num_text_blocks}")
    shallow, deep = sorted((num_image_blocks, num_text_blocks))
    pairs = [(i, (i + 1) * deep // shallow - 1) for i in range(shallow)]
    if num_image_blocks <= num_text_blocks:
        return pairs
    return [(j, i) for i, j in pairs]


def adapter_sites(tower: Tower) -> list[list[AdapterSite]]:
    """The adapter sites of each block of ``tower``, in order.

    Transformer blocks get two: the attention output and the MLP output, each just before its residual add
    (pre-LN: ``x + A(Attn(LN(x)))``; post-LN BERT: ``LN(x + Dropout(A(Dense(h))))``). Other blocks
    (convolutional ones) get one, on the block output, over the channel dimension.
    """
    sites = []
    for block in tower.blocks():
        if block.is_transformer:
            sites.append(
                [
                    AdapterSite(block.index, "attn", block.width, block.attention_output, "tokens"),
                    AdapterSite(block.index, "mlp", block.width, block.mlp_output, "tokens"),
                ]
            )
        else:
            sites.append([AdapterSite(block.index, "out", block.width, block.module, block.layout)])
    return sites


def _pair_positions(
    image_sites: list[AdapterSite], text_sites: list[AdapterSite]
) -> list[tuple[str, AdapterSite, AdapterSite]]:
    """Match the adapter sites of two paired blocks, with the key of their shared slot.

    Between transformer blocks: attention with attention and MLP with MLP. Otherwise the last site of each:
    a convolutional block's output adapter with the MLP-output adapter, the block's last sub-layer.
    """
    image_by_position = {site.position: site for site in image_sites}
    text_by_position = {site.position: site for site in text_sites}
    if set(image_by_position) == set(text_by_position):
        return [
            (position, image_by_position[position], text_by_position[position])
            for position in image_by_position
        ]
    image_last, text_last = image_sites[-1], text_sites[-1]
    return [(f"{image_last.position}_{text_last.position}", image_last, text_last)]


class CrossModalAdapter(AdaptationStrategy):
    """Cross-Modal Adapter: per-tower bottleneck adapters with partly shared up-projections.

    Jiang, Zhang, Huang, Ge, Ni, Song, Huang, "Cross-Modal Adapter for Vision-Language Retrieval", Pattern
    Recognition 159:111144 (online 2024); arXiv 2211.09623; official code ``LeapLabTHU/Cross-Modal-Adapter``.
    Details and reproduction: ``docs/methods/cross_modal_adapter.md``.

    * Two adapters per transformer block in both towers, on the attention output and on the MLP output,
      before each residual add: ``A(h) = h + Up(QuickGELU(Down(h)))`` with bottleneck ``r`` (default 8), no
      adapter norm, no dropout.
    * Partial sharing: each adapter has its own ``Down`` and its own ``Up`` rows for all but the last ``d_s``
      output channels (default 16); the last ``d_s`` rows (weight and bias) are one
      :class:`~pefttune.layers.shared_adapter.SharedUpProjection` used by the image and the text adapter of
      the same block index and position. The shared projections are registered once, here, as
      ``cma_shared_up[index][position]`` (``strategy.cma_shared_up...`` in the LightningModule); the adapters
      hold unregistered references. ``shared_dim=0`` gives plain uni-modal adapters.
    * Initialisation: truncated normal with std ``init_std`` (0.01) on every adapter weight, zero biases.
    * What trains: the adapters only. The backbones, the projection heads (unless ``train_heads``) and the
      temperature are frozen; the temperature stays at the checkpoint's scale (CLIP: 100) or, for towers
      without one, at ``temperature.init`` (1/0.07 when unset). BatchNorm layers keep their stored statistics
      in training mode too (``freeze_batchnorm_statistics``).
    * The paper's recipe (``configs/paper/cma_clip_vitb32.yaml``): AdamW with decoupled weight decay 0.2 on
      adapter weights (none on biases), lr 1e-5, betas (0.9, 0.98), eps 1e-6, 10% linear warm-up then
      cosine, gradient clipping 1.0, batch 128, 5 epochs. On CLIP ViT-B/32 that trains 519,168 parameters.
      Three differences from the official code remain: it uses BertAdam (the same decoupled weight decay,
      but no bias correction), its cosine counts progress over the whole run (not the steps after warm-up),
      and it holds the adapters in fp16 (here fp32 parameters under 16-bit autocast).
      The offline default (``configs/cma.yaml``) departs from it: heads trained, temperature fixed at 20,
      lr 1e-3, 3 epochs of batch 64 (reasons in the document).

    Deviations and extensions (the paper covers two equal-depth CLIP transformers only):

    * Towers of different depth: blocks pair one to one by relative depth from the output side
      (:func:`pair_blocks`); unpaired blocks of the deeper tower get uni-modal adapters (all ``Up`` rows their
      own).
    * Convolutional blocks get one adapter on the block output, over channels; paired with a transformer
      block it shares with that block's MLP-output adapter, whose attention-output adapter stays uni-modal.
    * A paired site whose width is ``<= d_s`` on either side cannot keep a unique row; that pair gets two
      uni-modal adapters instead (no EfficientNet-Lite0 block is affected at ``d_s = 16``: the narrowest is
      16 wide and is unpaired against MiniLM).
    * ``train_heads=True`` also trains the projection heads: for towers whose heads are new random layers
      (the offline default), unlike CLIP's pretrained projections. Off by default (the paper's setting).
    * The backbone's own dropout is left as configured (CLIP has none).

    Args:
        bottleneck: ``r``.
        shared_dim: ``d_s``, the number of shared up-projection channels; 0 disables sharing.
        init_std: std of the truncated-normal weight initialisation.
        train_heads: also train both projection heads (group ``head``).
        freeze_batchnorm_statistics: keep BatchNorm layers on their running statistics during training.
        temperature: overrides the default policy (fixed at the checkpoint's scale).
        group_lr: absolute learning rates per parameter group.
        no_decay_norms_and_biases: exclude biases (and any scalar) from weight decay.
    """

    prefix: ClassVar[str] = "cma_"
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(
        init=None, learnable=False, max_scale=None
    )
    init_only_arguments: ClassVar[tuple[str, ...]] = ("init_std", "freeze_batchnorm_statistics")

    def __init__(
        self,
        bottleneck: int = 8,
        shared_dim: int = 16,
        init_std: float = 0.01,
        train_heads: bool = False,
        freeze_batchnorm_statistics: bool = True,
        temperature: TemperaturePolicy | None = None,
        group_lr: dict[str, float] | None = None,
        no_decay_norms_and_biases: bool = True,
    ) -> None:
        super().__init__(
            temperature=temperature, group_lr=group_lr, no_decay_norms_and_biases=no_decay_norms_and_biases
        )
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        if shared_dim < 0:
            raise ValueError(f"shared_dim must be >= 0, got {shared_dim}")
        if init_std <= 0:
            raise ValueError(f"init_std must be positive, got {init_std}")
        self.bottleneck = bottleneck
        self.shared_dim = shared_dim
        self.init_std = init_std
        self.train_heads = train_heads
        self.freeze_batchnorm_statistics = freeze_batchnorm_statistics
        self.cma_shared_up = nn.ModuleList()
        self.block_pairs: list[tuple[int, int]] = []
        self.shared_slots: list[SharedSlot] = []

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Create the shared rows of each block pair, insert the adapters into both towers, unfreeze them."""
        image_sites, text_sites = adapter_sites(image_tower), adapter_sites(text_tower)
        shared = self._share_up_projections(image_sites, text_sites)
        self.cma_shared_up.to(_parameter_device(image_tower)).requires_grad_(True)
        self._insert_adapters(image_tower, image_sites, shared["image"])
        self._insert_adapters(text_tower, text_sites, shared["text"])

    def _share_up_projections(
        self, image_sites: list[list[AdapterSite]], text_sites: list[list[AdapterSite]]
    ) -> dict[str, dict[tuple[int, str], SharedUpProjection]]:
        """Pair the blocks and create one shared projection per paired site (``cma_shared_up``).

        Returns:
            Per tower (``image``, ``text``), ``(block, position) -> rows`` for every site that shares.
        """
        self.block_pairs = pair_blocks(len(image_sites), len(text_sites))
        shared: dict[str, dict[tuple[int, str], SharedUpProjection]] = {"image": {}, "text": {}}
        for index, (image_block, text_block) in enumerate(self.block_pairs):
            slots = nn.ModuleDict()
            pairs = _pair_positions(image_sites[image_block], text_sites[text_block])
            for key, image_site, text_site in pairs:
                if self.shared_dim == 0 or min(image_site.width, text_site.width) <= self.shared_dim:
                    continue
                projection = SharedUpProjection(self.bottleneck, self.shared_dim, self.init_std)
                slots[key] = projection
                shared["image"][image_block, image_site.position] = projection
                shared["text"][text_block, text_site.position] = projection
                self.shared_slots.append(SharedSlot(index, key, image_site, text_site))
            self.cma_shared_up.append(slots)
        return shared

    def _insert_adapters(
        self, tower: Tower, sites: list[list[AdapterSite]], shared: dict[tuple[int, str], SharedUpProjection]
    ) -> None:
        """An adapter at every site of ``tower`` (with its shared rows, if any); heads and norms as set."""
        for site in (site for block in sites for site in block):
            rows = shared.get((site.block, site.position))
            adapter = SharedUpAdapter(site.width, self.bottleneck, rows, self.init_std, site.layout)
            adapter.to(_parameter_device(tower))
            add_output_transform(site.host, site.attribute, adapter)
            adapter.requires_grad_(True)
        if self.train_heads:
            unfreeze_projection(tower)
        if self.freeze_batchnorm_statistics:
            freeze_batchnorm_statistics(tower)

    def adapters(self, tower: Tower) -> list[SharedUpAdapter]:
        """The adapters inserted into ``tower``, in block order."""
        return [module for module in tower.modules() if isinstance(module, SharedUpAdapter)]


def _parameter_device(tower: Tower) -> Any:
    return next(tower.parameters()).device
