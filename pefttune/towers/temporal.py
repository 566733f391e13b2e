"""Temporal aggregation: from the embeddings of a clip's frames to one video embedding.

A video enters the model as ``pixel_values`` [B, T, C, H, W] with a ``frame_mask`` [B, T] (True = a real
frame; clips shorter than T are padded). :class:`~pefttune.module.DualEncoderModule` folds T into the batch,
runs the image tower on every frame ([B*T, C, H, W] -> [B*T, D]) and hands the frame embeddings [B, T, D]
with the mask to a :class:`TemporalAggregator`, which returns one (unnormalised) embedding per video [B, D].
Losses, metrics and strategies then see one embedding per item, exactly as for images.

Two aggregators follow CLIP4Clip (Luo et al., 2022; ``ArrowLuo/CLIP4Clip``, ``modules/modeling.py``,
``_loose_similarity``), whose "parameter-free" and "sequential" similarity heads the Cross-Modal Adapter
reuses unchanged:

* :class:`MeanPooling` (CLIP4Clip ``meanP``, the Cross-Modal Adapter's setting): every frame embedding is
  L2-normalised, then averaged over the real frames. No parameters. It ignores frame order: a clip and the
  same clip reversed get the same embedding.
* :class:`SequenceTransformer` (CLIP4Clip ``seqTransf``): learned frame-position embeddings are added to the
  (normalised, see below) frame embeddings, a small pre-LayerNorm transformer encoder (CLIP's residual
  attention block, QuickGELU MLP; padded frames masked out as attention keys) runs over the T frames, its
  output is added back to the input frame embeddings (a residual around the whole module), then the same
  normalise-and-average as ``meanP``. Frame order now matters.

Initialisation of :class:`SequenceTransformer`: CLIP4Clip copies CLIP's text position embeddings and the
first ``cross_num_hidden_layers`` (4) blocks of CLIP's *text* transformer into the module. pefttune's towers
are not always CLIP (and a CLIP text tower need not have the embedding width), so the module instead starts
from CLIP4Clip's own fallback initialisation (normal, std 0.02, for linear and embedding weights; zero
biases; unit LayerNorm gains) with the two output projections of every block (attention ``out_proj`` and
MLP ``c_proj``) set to zero. Every residual branch then starts at zero, the transformer is the identity,
and the module computes ``normalise(2 * frame + position)`` per frame: mean pooling plus small position
offsets. Training moves it away from ``meanP`` only as far as the data asks.

One more difference: the frame embeddings are L2-normalised before they enter the module (CLIP4Clip feeds
CLIP's raw projected embeddings, whose scale CLIP's training fixed). pefttune's towers give embeddings of
very different norms (measured on generated frames: about 18 for EfficientNet-Lite0 with a new 512-wide
head, about 0.03 for the tiny convolutional test tower), and both the additive position table and the
transformer's residual stream depend on that scale: on small raw embeddings the positions would drown the
frames and every video would start out alike. On unit-length frames the module behaves the same for every
tower. Normalising also matches what ``meanP`` averages (normalised frames), so the residual ``+ frame``
term is exactly ``meanP``'s input.

A new aggregator subclasses :class:`TemporalAggregator` and implements :meth:`TemporalAggregator.build`
(create parameters for the embedding width) and :meth:`TemporalAggregator.aggregate`.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from pefttune.layers.shared_adapter import QuickGELU

__all__ = ["MeanPooling", "SequenceTransformer", "TemporalAggregator", "masked_mean"]


def masked_mean(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``frames`` [B, T, D] over the frames where ``frame_mask`` [B, T] is True -> [B, D].

    CLIP4Clip's ``_mean_pooling_for_similarity_visual``: padded frames are multiplied by 0 and the sum is
    divided by the number of real frames.
    """
    weights = frame_mask.to(frames.dtype).unsqueeze(-1)
    return (frames * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TemporalAggregator(nn.Module, abc.ABC):
    """Frame embeddings [B, T, D] and a frame mask [B, T] -> one unnormalised video embedding [B, D].

    The model calls :meth:`bind` once with the image tower's embedding width before training, so a config
    names an aggregator without repeating the width. Parameters of an aggregator live under the model's
    ``temporal.`` prefix and form the ``temporal`` parameter group (they train under every strategy: no
    pretrained weights exist for them).

    """

    def __init__(self) -> None:
        super().__init__()
        self.width: int | None = None

    def bind(self, width: int) -> None:
        """Build the aggregator for embeddings of ``width`` (once; again with the same width is a no-op)."""
        if width < 1:
            raise ValueError(f"{type(self).__name__}: the embedding width must be positive, got {width}")
        if self.width is not None:
            if self.width != width:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.width}-wide embeddings, but the image tower "
                    f"gives {width}-wide ones"
                )
            return
        self.build(width)
        self.width = width

    @abc.abstractmethod
    def build(self, width: int) -> None:
        """Create the parameters for embeddings of ``width`` (called once by :meth:`bind`)."""

    @abc.abstractmethod
    def aggregate(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """The video embeddings [B, D] of checked frame embeddings [B, T, D] and a boolean mask [B, T]."""

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Check the shapes and the mask, then :meth:`aggregate`.

        Args:
            frames: frame embeddings [B, T, D].
            frame_mask: True for real frames [B, T]; ``None`` means every frame is real.

        Returns:
            Unnormalised video embeddings [B, D].

        Raises:
            RuntimeError: if the aggregator was never bound to a width.
            ValueError: if the shapes disagree or a video has no real frame.
        """
        if self.width is None:
            raise RuntimeError(
                f"{type(self).__name__} has no width yet: call bind(embed_dim) first (DualEncoderModule does)"
            )
        if frames.ndim != 3 or frames.shape[-1] != self.width:
            raise ValueError(
                f"{type(self).__name__} expects frame embeddings [B, T, {self.width}], "
                f"got shape {tuple(frames.shape)}"
            )
        if frame_mask is None:
            frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        if tuple(frame_mask.shape) != tuple(frames.shape[:2]):
            raise ValueError(
                f"frame_mask must be [B, T] = {tuple(frames.shape[:2])} like the frames, "
                f"got {tuple(frame_mask.shape)}"
            )
        frame_mask = frame_mask.to(device=frames.device, dtype=torch.bool)
        empty = ~frame_mask.any(dim=1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).flatten().tolist()
            raise ValueError(
                f"videos at batch rows {rows[:10]} have no real frame (frame_mask all False): a clip needs "
                "at least one frame"
            )
        return self.aggregate(frames, frame_mask)


class MeanPooling(TemporalAggregator):
    """CLIP4Clip ``meanP``: L2-normalise each frame embedding, average over the real frames. No parameters.

    The Cross-Modal Adapter's video setting. Order-invariant: permuting a clip's frames leaves the
    embedding unchanged, so captions that differ only in the direction of time cannot be told apart.

    Args:
        width: the embedding width when used on its own (``None``: the model binds it).
    """

    def __init__(self, width: int | None = None) -> None:
        super().__init__()
        if width is not None:
            self.bind(width)

    def build(self, width: int) -> None:
        """Nothing to build."""

    def aggregate(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the normalised frame embeddings."""
        return masked_mean(F.normalize(frames, dim=-1), frame_mask)


class _ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (4x QuickGELU MLP)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, D]; ``padding`` [B, T] True where a frame is padding (never attended to)."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SequenceTransformer(TemporalAggregator):
    """CLIP4Clip ``seqTransf``: a transformer over the frame embeddings, residual to the mean-pooled frames.

    ``out_t = transformer(f_t + position_t) + f_t`` with ``f_t`` the normalised frame embedding; the video
    embedding is the mean over real frames
    of ``normalise(out_t)``. Padded frames take part neither as attention keys nor in the mean. The module
    starts at mean pooling plus small position offsets (see the module docstring for the initialisation
    and how it differs from CLIP4Clip's copy of CLIP's text transformer).

    Args:
        num_layers: transformer blocks (CLIP4Clip ``cross_num_hidden_layers``: 4).
        num_heads: attention heads; ``None`` takes CLIP's rule, width // 64 (at least 1); must divide the
            width.
        max_frames: rows of the frame-position table, the longest clip the module accepts (CLIP4Clip sizes it
            by CLIP's text context, 77).
        init_std: standard deviation of the normal initialisation of linear and embedding weights
            (CLIP4Clip's ``initializer_range``: 0.02).
        width: the embedding width when built on its own (``None``: the model binds it).
    """

    def __init__(
        self,
        num_layers: int = 4,
        num_heads: int | None = None,
        max_frames: int = 77,
        init_std: float = 0.02,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"SequenceTransformer needs at least one layer, got num_layers={num_layers}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        if num_heads is not None and num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.max_frames = max_frames
        self.init_std = init_std
        self.heads = 0
        if width is not None:
            self.bind(width)

    def build(self, width: int) -> None:
        """Create the position table and the blocks, then initialise them (residual branches at zero)."""
        heads = self.num_heads if self.num_heads is not None else max(1, width // 64)
        if width % heads:
            raise ValueError(f"SequenceTransformer: num_heads={heads} does not divide the width {width}")
        self.heads = heads
        self.frame_position_embeddings = nn.Embedding(self.max_frames, width)
        self.blocks = nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(self.num_layers))
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.MultiheadAttention):
                # MultiheadAttention keeps its q/k/v weights in one parameter (not a Linear).
                nn.init.normal_(module.in_proj_weight, std=self.init_std)
                nn.init.zeros_(module.in_proj_bias)
        for block in self.blocks:
            # Residual branches start at zero: the module starts as mean pooling (plus positions).
            nn.init.zeros_(block.attn.out_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def aggregate(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Positions, transformer, residual to the input frames, then normalised masked mean."""
        length = frames.shape[1]
        if length > self.max_frames:
            raise ValueError(
                f"SequenceTransformer has positions for {self.max_frames} frames, got clips of {length}; "
                "raise max_frames"
            )
        # Unit-length inputs: the position table and the residual stream then have one scale for every tower
        # (raw tower outputs range from ~0.03 to ~30 in norm; see the module docstring).
        frames = F.normalize(frames, dim=-1)
        positions = torch.arange(length, device=frames.device)
        hidden = frames + self.frame_position_embeddings(positions).to(frames.dtype)
        padding = ~frame_mask
        for block in self.blocks:
            hidden = block(hidden, padding)
        hidden = hidden + frames
        return masked_mean(F.normalize(hidden, dim=-1), frame_mask)
