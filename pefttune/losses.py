"""Contrastive losses for image-text dual encoders, exact under data parallelism.

Every loss takes L2-normalised embeddings ``[B_local, D]`` (row ``i`` of the image and text tensors is a
pair), the logit *scale* (not its log) and, for SigLIP, a logit bias.

Distributed semantics (shared by every loss here)
--------------------------------------------------
Let ``W`` be the world size, ``B_r`` the local batch size of rank ``r`` and ``N = sum_r B_r`` the global
batch. DistributedDataParallel (DDP) *averages* parameter gradients over ranks, so the gradient the
optimiser sees is ``(1/W) * sum_r dL_r/dtheta``, where the derivative of ``L_r`` also reaches rank ``r``'s
embeddings through the other ranks' losses when the all-gather carries gradient (its backward sums the
gradient of every rank's copy, see :func:`gather_with_grad`). Each loss here is a mean over ``N`` anchors
in the single process, ``L = (1/N) * sum_i l_i``. Rank ``r`` therefore returns

    ``L_r = (W / N) * sum_{i local to r} l_i``

so that ``(1/W) * sum_r L_r == L`` holds as a function of all parameters, and DDP's averaged gradient is
exactly the single-process gradient over the global batch, for the towers *and* for the logit scale/bias
(which are used locally and reach the optimiser only through DDP's average). When all ranks hold ``B``
samples, ``W / N == 1 / B`` (the plain local mean). Normalising by the *global* mean batch size ``N / W``
instead of ``B_r`` keeps the equality exact when per-rank batch sizes differ (the last batch of an iterable
dataset, for example); with ``1 / B_r`` small ranks would be over-weighted.

Consequences for logging: the mean of ``L_r`` over ranks (e.g. Lightning's ``self.log(...,
sync_dist=True)``) is the global loss. A single rank's value is its share, not the global loss. Do not
multiply the loss by ``W`` and do not divide gradients by ``W`` anywhere else.

Precision: embeddings, scale and bias are cast to at least float32 and the logits and the loss are
computed with autocast disabled, because bf16/fp16 logits at scale ~100 lose the small differences that
softmax and log-sigmoid depend on. The returned loss is float32 (float64 for float64 inputs).

Only the default process group is used; distributed mode is active when ``torch.distributed`` is
initialised with a world size above one, otherwise every helper is a no-op.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Re-exported: the loss documents the batch key ``image_hashes`` that this function fills.
from pefttune.data.records import image_content_hash

__all__ = [
    "IMAGE_IDENTITIES",
    "ContrastiveLoss",
    "InfoNCELoss",
    "MultiPositiveInfoNCELoss",
    "SigLIPLoss",
    "gather_no_grad",
    "gather_with_grad",
    "image_content_hash",
]

#: How a multi-positive loss decides that two batch items show the same image: by the data set's image id,
#: or by the content of the image file (byte-identical files are one image, whatever their ids).
IMAGE_IDENTITIES: tuple[str, ...] = ("id", "content")


def _world() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherStacked(torch.autograd.Function):
    """All-gather equally sized tensors into ``[W, *x.shape]`` with a summing backward.

    The backward sums, over ranks, the gradient each rank's loss put on this rank's slice: that is the
    derivative of ``sum_r L_r`` with respect to the local tensor. ``all_reduce`` is used instead of
    ``reduce_scatter`` because gloo lacks the latter; the cost (one all-reduce of ``N x D`` floats) is
    small next to the towers.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        rank, world = _world()
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # all_reduce works in place; never write into a gradient buffer autograd may still own.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass, multiplies the gradient by a constant in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class _Gatherer:
    """Concatenates per-rank tensors along dim 0 when per-rank sizes may differ.

    Construction runs one collective (all ranks exchange their local batch size), so every rank must
    build a gatherer at the same point. Tensors are zero-padded to the largest local size, gathered and
    unpadded; padded rows never reach a loss, so they receive zero gradient.

    Args:
        local_size: Number of rows this rank contributes.
        device: Device of the tensors to gather (a CUDA device for NCCL, CPU for gloo).
    """

    def __init__(self, local_size: int, device: torch.device) -> None:
        self.rank, self.world_size = _world()
        if self.world_size == 1:
            self.sizes = [local_size]
        else:
            mine = torch.tensor([local_size], dtype=torch.long, device=device)
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine)
            self.sizes = [int(p.item()) for p in parts]
        self.offset = sum(self.sizes[: self.rank])
        self.global_size = sum(self.sizes)
        if self.global_size == 0:
            raise ValueError("The global batch is empty: every rank passed zero rows.")

    @property
    def distributed(self) -> bool:
        """Whether more than one rank takes part."""
        return self.world_size > 1

    @property
    def anchor_weight(self) -> float:
        """Weight ``W / N`` of one local anchor's loss term (see the module docstring)."""
        return self.world_size / self.global_size

    def _pad(self, x: Tensor) -> Tensor:
        missing = max(self.sizes) - x.shape[0]
        if missing == 0:
            return x
        return torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])

    def _unpad(self, stacked: Tensor) -> list[Tensor]:
        return [stacked[r, :n] for r, n in enumerate(self.sizes)]

    def with_grad(self, x: Tensor) -> Tensor:
        """Gather ``x`` from every rank; gradients flow back to every rank's tensor."""
        if not self.distributed:
            return x
        return torch.cat(self._unpad(_AllGatherStacked.apply(self._pad(x))))

    def no_grad(self, x: Tensor, local_grad_scale: float | None = None) -> Tensor:
        """Gather ``x`` from every rank without autograd.

        Args:
            x: Local tensor.
            local_grad_scale: If given, this rank's slice of the result is ``x`` itself (with its
                gradient multiplied by this factor) instead of a detached copy.

        Returns:
            The concatenation over ranks.
        """
        if not self.distributed:
            if local_grad_scale is None:
                return x.detach()
            return x if local_grad_scale == 1.0 else _ScaleGrad.apply(x, local_grad_scale)
        with torch.no_grad():
            padded = self._pad(x).contiguous()
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            pieces = self._unpad(torch.stack(parts))
        if local_grad_scale is not None:
            pieces[self.rank] = x if local_grad_scale == 1.0 else _ScaleGrad.apply(x, local_grad_scale)
        return torch.cat(pieces)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping autograd across ranks.

    Per-rank sizes along dim 0 may differ (sizes are exchanged first and tensors padded, then unpadded).
    The backward pass gives each rank the *sum* over ranks of the gradient with respect to its slice,
    which is what makes local-loss training exact under DDP's gradient averaging (see the module
    docstring). Every rank must call this function the same number of times in the same order.

    Args:
        x: Local tensor ``[B_local, ...]``; trailing dimensions must match across ranks.

    Returns:
        ``[sum of B_local over ranks, ...]`` in rank order. In a single process, ``x`` itself.
    """
    return _Gatherer(x.shape[0], x.device).with_grad(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 without autograd (for ids, metrics, logging).

    Per-rank sizes along dim 0 may differ. Every rank must call this function at the same point.

    Args:
        x: Local tensor ``[B_local, ...]``; trailing dimensions must match across ranks.

    Returns:
        ``[sum of B_local over ranks, ...]`` in rank order, detached. In a single process,
        ``x.detach()`` (a view, no copy).
    """
    return _Gatherer(x.shape[0], x.device).no_grad(x)


class ContrastiveLoss(nn.Module):
    """Base class of the image-text losses: input checks, float32 computation and the shared contract.

    Subclasses implement :meth:`compute`, which receives float32 (or float64) tensors with autocast
    disabled, and must follow the distributed normalisation described in the module docstring.

    Attributes:
        needs_bias: Whether the loss uses an additive logit bias; the LightningModule then owns a
            learnable scalar ``logit_bias`` and passes it to :meth:`forward`.
        init_scale: Recommended initial logit scale, or ``None`` when the strategy's temperature policy
            decides (e.g. a pretrained CLIP's learned scale, DueT's fixed 64).
        init_bias: Recommended initial logit bias when ``needs_bias``, else ``None``.
    """

    needs_bias: ClassVar[bool] = False
    init_scale: ClassVar[float | None] = None
    init_bias: ClassVar[float | None] = None
    #: ``"content"``: the batch's ``image_hashes`` identify images instead of its ``image_ids``
    #: (:class:`MultiPositiveInfoNCELoss` option; the other losses use no image identity).
    image_identity: str = "id"

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        image_ids: Tensor | None = None,
        text_ids: Tensor | None = None,
        image_hashes: Tensor | None = None,
    ) -> Tensor:
        """Compute this rank's loss.

        Args:
            image_embeds: ``[B_local, D]`` L2-normalised image embeddings.
            text_embeds: ``[B_local, D]`` L2-normalised text embeddings; row ``i`` pairs with image ``i``.
            logit_scale: The multiplicative scale ``1 / tau`` (not its log), a 0-dim tensor that may
                require grad, or a float for a fixed temperature.
            logit_bias: Additive logit bias, required exactly when ``needs_bias``.
            image_ids: ``[B_local]`` integer ids, equal for equal images across the whole dataset (not
                batch-local indices). Used by losses with multiple positives, ignored otherwise.
            text_ids: ``[B_local]`` integer ids, equal for equal caption strings; as ``image_ids``.
            image_hashes: ``[B_local]`` int64 content hashes of the image files
                (:func:`image_content_hash`), the batch key ``image_hashes``; used instead of ``image_ids``
                when ``image_identity == "content"``, required then.

        Returns:
            A 0-dim float32 (float64 for float64 inputs) loss; see the module docstring for how the
            per-rank values combine under DDP.

        Raises:
            ValueError: On mismatched shapes, a bias given to / missing from a loss, or missing
                ``image_hashes`` under ``image_identity="content"``.
        """
        if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                "image_embeds and text_embeds must both be [B, D] with the same shape, got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
            )
        for name, ids in (("image_ids", image_ids), ("text_ids", text_ids), ("image_hashes", image_hashes)):
            if ids is not None and tuple(ids.shape) != (image_embeds.shape[0],):
                raise ValueError(f"{name} must have shape [{image_embeds.shape[0]}], got {tuple(ids.shape)}.")
        if self.image_identity == "content":
            if image_hashes is None:
                raise ValueError(
                    f"{type(self).__name__}(image_identity='content') needs the batch key 'image_hashes' "
                    "(int64 [B], a content hash of each image file: pefttune.losses.image_content_hash), "
                    "which this data module does not provide; use image_identity='id' or a data module "
                    "that emits it"
                )
            image_ids = image_hashes
        if self.needs_bias and logit_bias is None:
            raise ValueError(f"{type(self).__name__} needs a logit_bias.")
        if not self.needs_bias and logit_bias is not None:
            raise ValueError(f"{type(self).__name__} does not use a logit bias (needs_bias is False).")

        dtype = torch.promote_types(torch.promote_types(image_embeds.dtype, text_embeds.dtype), torch.float32)
        device = image_embeds.device
        with torch.autocast(device_type=device.type, enabled=False):
            scale = torch.as_tensor(logit_scale, device=device).to(dtype).reshape(())
            bias = None if logit_bias is None else torch.as_tensor(logit_bias, device=device).to(dtype)
            return self.compute(
                image_embeds.to(dtype),
                text_embeds.to(dtype),
                scale,
                None if bias is None else bias.reshape(()),
                image_ids,
                text_ids,
            )

    def compute(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        image_ids: Tensor | None,
        text_ids: Tensor | None,
    ) -> Tensor:
        """Compute the loss from validated, float32 inputs (autocast disabled).

        Args:
            image_embeds: ``[B_local, D]`` image embeddings.
            text_embeds: ``[B_local, D]`` text embeddings.
            logit_scale: 0-dim scale.
            logit_bias: 0-dim bias or ``None``.
            image_ids: ``[B_local]`` image ids or ``None``.
            text_ids: ``[B_local]`` text ids or ``None``.

        Returns:
            This rank's loss.
        """
        raise NotImplementedError


def _sum_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="sum")


class InfoNCELoss(ContrastiveLoss):
    """Symmetric InfoNCE of CLIP (Radford et al., 2021): ``0.5 * (CE(S, diag) + CE(S^T, diag))``.

    ``S = logit_scale * X Y^T`` over the global batch. Distributed options follow open_clip's ``ClipLoss``
    naming, with the gradient scale made exact in every supported combination (``W`` ranks, ``N``
    samples in total; see the module docstring for the normalisation):

    * ``gather_with_grad=True, local_loss=True`` (default, open_clip's recommended setting, the only one
      that scales): each rank builds its ``B_local x N`` rows of ``S`` (local images against all texts)
      and of ``S^T`` (local texts against all images), labels offset by the number of samples on earlier
      ranks. Exact: DDP's averaged gradient equals the single-process gradient over the global batch.
    * ``gather_with_grad=True, local_loss=False``: every rank computes the full ``N x N`` loss, so every
      rank returns the global loss. The gather's backward sums ``W`` identical contributions per slice
      and DDP divides by ``W``: exact, but ``W`` times the logits work.
    * ``gather_with_grad=False, local_loss=False``: full ``N x N`` loss on every rank with the other ranks'
      embeddings as constants. Each rank's own embeddings then get the exact global partial
      derivative; their gradient is multiplied by ``W`` so that DDP's average does not shrink the tower
      gradients by ``1/W`` relative to the logit scale (the pitfall of open_clip #616 / lightly #1977).
      Exact, with no communication in the backward pass.
    * ``gather_with_grad=False, local_loss=True``: cheapest, **approximate**. The loss value and the
      logit-scale gradient are exact, but a rank's embeddings get no gradient from their role as
      negatives of other ranks' anchors: the result equals the single-process gradient of the global
      loss in which, for each anchor, embeddings from other ranks are detached.

    ``image_ids`` and ``text_ids`` are ignored; use :class:`MultiPositiveInfoNCELoss` when a batch can
    contain duplicate images or captions.

    Args:
        gather_with_grad: Let gradients flow through the all-gather to other ranks' embeddings.
        local_loss: Compute only this rank's rows of the similarity matrix.
    """

    def __init__(self, gather_with_grad: bool = True, local_loss: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def extra_repr(self) -> str:
        """Show the distributed options in the module's repr."""
        return f"gather_with_grad={self.gather_with_grad}, local_loss={self.local_loss}"

    def compute(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        image_ids: Tensor | None,
        text_ids: Tensor | None,
    ) -> Tensor:
        """Compute this rank's symmetric InfoNCE loss (see :meth:`ContrastiveLoss.compute`)."""
        gatherer = _Gatherer(image_embeds.shape[0], image_embeds.device)
        dim = image_embeds.shape[1]
        # One collective for both modalities keeps the backward all-reduces in a single, fixed order.
        pair = torch.cat([image_embeds, text_embeds], dim=1)
        if self.gather_with_grad:
            all_pairs = gatherer.with_grad(pair)
        else:
            # With the full matrix on every rank, scaling the local gradient by W undoes DDP's 1/W.
            factor = 1.0 if self.local_loss else float(gatherer.world_size)
            all_pairs = gatherer.no_grad(pair, local_grad_scale=factor)
        all_images, all_texts = all_pairs.split(dim, dim=1)

        if self.local_loss or not gatherer.distributed:
            targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + gatherer.offset
            image_logits = logit_scale * image_embeds @ all_texts.T
            text_logits = logit_scale * text_embeds @ all_images.T
            total = _sum_cross_entropy(image_logits, targets) + _sum_cross_entropy(text_logits, targets)
            return 0.5 * gatherer.anchor_weight * total

        logits = logit_scale * all_images @ all_texts.T
        targets = torch.arange(gatherer.global_size, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class MultiPositiveInfoNCELoss(ContrastiveLoss):
    """UniCL-style multi-positive contrastive loss, as used by DueT (Hasegawa et al., EMNLP 2023, Eq. 3-4).

    The positives of anchor ``i`` are ``P_i = {k : image_ids[k] == image_ids[i] or text_ids[k] ==
    text_ids[i]}`` over the global batch (``i`` included), and::

        L_i2t = -(1/N) sum_i (1/|P_i|) sum_{k in P_i} log softmax_j(s_ij)[k]
        L_t2i = the same with images and texts swapped
        L     = L_i2t + L_t2i           (reduction_over_directions="sum", DueT)
              = (L_i2t + L_t2i) / 2     (reduction_over_directions="mean", CLIP-comparable scale)

    DueT trains with a fixed ``tau = 1/64`` (pass ``logit_scale=64.0``). A missing id tensor contributes
    no extra positives; with both missing the positives are the diagonal and the loss equals
    :class:`InfoNCELoss` times 2 ("sum") or times 1 ("mean"). Ids must identify content globally (e.g. a
    hash or a dataset-level id of the image / of the distinct caption string), because ids from all ranks
    are compared.

    Under DDP, embeddings are gathered with gradient and ids without; each rank computes its local
    anchors against the global batch (exact, like :class:`InfoNCELoss`'s default).

    **Which images are the same.** ``image_identity="id"`` (default) compares the data set's image ids.
    Web data holds the same image under several ids (re-uploads, mirrors); with ``"content"`` two items
    are the same image when their files are byte-identical: the batch's ``image_hashes``
    (:func:`image_content_hash` of each file's bytes) replace ``image_ids``, so duplicates are each
    other's positives rather than negatives.

    Args:
        reduction_over_directions: ``"sum"`` (DueT) or ``"mean"`` of the two directions.
        image_identity: ``"id"`` or ``"content"``.
    """

    def __init__(
        self,
        reduction_over_directions: Literal["sum", "mean"] = "sum",
        image_identity: Literal["id", "content"] = "id",
    ) -> None:
        super().__init__()
        if reduction_over_directions not in ("sum", "mean"):
            raise ValueError(
                f"reduction_over_directions must be 'sum' or 'mean', got {reduction_over_directions!r}."
            )
        if image_identity not in IMAGE_IDENTITIES:
            raise ValueError(f"image_identity must be one of {IMAGE_IDENTITIES}, got {image_identity!r}.")
        self.reduction_over_directions = reduction_over_directions
        self.image_identity = image_identity

    def extra_repr(self) -> str:
        """Show the reduction and the image identity in the module's repr."""
        return (
            f"reduction_over_directions={self.reduction_over_directions!r}, "
            f"image_identity={self.image_identity!r}"
        )

    def compute(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        image_ids: Tensor | None,
        text_ids: Tensor | None,
    ) -> Tensor:
        """Compute this rank's multi-positive loss (see :meth:`ContrastiveLoss.compute`)."""
        local_size, dim = image_embeds.shape
        device = image_embeds.device
        gatherer = _Gatherer(local_size, device)
        all_images, all_texts = gatherer.with_grad(torch.cat([image_embeds, text_embeds], dim=1)).split(
            dim, dim=1
        )

        # P_i is symmetric in images and texts, so one [B_local, N] mask serves both directions.
        local_rows = torch.arange(local_size, device=device)
        positives = torch.zeros(local_size, gatherer.global_size, dtype=torch.bool, device=device)
        positives[local_rows, local_rows + gatherer.offset] = True
        for ids in (image_ids, text_ids):
            if ids is not None:
                positives |= ids[:, None] == gatherer.no_grad(ids)[None, :]
        inverse_count = 1.0 / positives.sum(dim=1).to(image_embeds.dtype)

        def direction(logits: Tensor) -> Tensor:
            log_probs = logits.log_softmax(dim=1)
            per_anchor = torch.where(positives, log_probs, torch.zeros_like(log_probs)).sum(dim=1)
            return -(per_anchor * inverse_count).sum()

        total = direction(logit_scale * image_embeds @ all_texts.T) + direction(
            logit_scale * text_embeds @ all_images.T
        )
        if self.reduction_over_directions == "mean":
            total = 0.5 * total
        return gatherer.anchor_weight * total


class SigLIPLoss(ContrastiveLoss):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., ICCV 2023, arXiv 2303.15343).

    With ``z_ij = logit_scale * x_i . y_j + logit_bias`` and labels ``+1`` on the diagonal, ``-1``
    elsewhere, ``L = -(1/N) sum_i sum_j log sigmoid(label_ij * z_ij)`` (summed over all pairs, normalised
    per image as in the paper). The paper initialises the scale to 10 (``log`` scale ``log 10``) and the
    bias to -10 so that the many negatives start with a small loss; see :attr:`init_scale` and
    :attr:`init_bias`.

    Under DDP each rank scores its local images against all texts, gathered with gradient (a gather
    replaces the paper's ring of text chunks; the result is the same), with the ``W / N`` normalisation of
    the module docstring, so DDP's averaged gradient equals the single-process one. ``image_ids`` and
    ``text_ids`` are ignored.
    """

    needs_bias: ClassVar[bool] = True
    init_scale: ClassVar[float | None] = 10.0
    init_bias: ClassVar[float | None] = -10.0

    def compute(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        image_ids: Tensor | None,
        text_ids: Tensor | None,
    ) -> Tensor:
        """Compute this rank's sigmoid loss (see :meth:`ContrastiveLoss.compute`)."""
        if logit_bias is None:
            raise ValueError("SigLIPLoss needs a logit_bias.")
        local_size = image_embeds.shape[0]
        device = image_embeds.device
        gatherer = _Gatherer(local_size, device)
        all_texts = gatherer.with_grad(text_embeds)
        logits = logit_scale * image_embeds @ all_texts.T + logit_bias
        signs = torch.full_like(logits, -1.0)
        local_rows = torch.arange(local_size, device=device)
        signs[local_rows, local_rows + gatherer.offset] = 1.0
        return -gatherer.anchor_weight * F.logsigmoid(signs * logits).sum()
