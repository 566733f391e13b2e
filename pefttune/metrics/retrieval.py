"""Image-text retrieval as a ``torchmetrics.Metric``: accumulate embeddings, de-duplicate, rank.

The metric stores embeddings and ids (``cat`` states), so under DDP every rank holds the whole
evaluation set after synchronisation and computes the same numbers. All ranking logic lives in
:mod:`pefttune.metrics.functional`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from pefttune.metrics.functional import (
    DEFAULT_COLLAPSE_SPREAD,
    DEFAULT_KS,
    DEFAULT_TIES,
    QueryOutcomes,
    Ties,
    _check_chunk_size,
    _check_ties,
    _listed,
    _normalise_ks,
    collapse_diagnostics,
    count_zero_rows,
    metrics_from_outcomes,
    retrieval_outcomes,
)

__all__ = ["RankedQueries", "RetrievalMetrics"]

_QUERY_FILE_VERSION = 1


@dataclass(frozen=True)
class RankedQueries:
    """The per-query outcomes of one retrieval evaluation, with the ids that identify the queries.

    What a paired comparison of two models needs: the same query ids on both sides, and each query's
    counts (:class:`~pefttune.metrics.functional.QueryOutcomes`), from which R@K under any tie rule follows.
    Saved compactly as an ``.npz`` (int32/int64 arrays, compressed) by :meth:`save`.

    Attributes:
        image_ids: Id of each image query, ascending [N_img].
        caption_ids: Id of each caption query (caption record id), ascending [N_txt].
        caption_image_ids: Id of each caption's image [N_txt] (captions of one image are correlated
            queries: the paired bootstrap resamples images with all their captions).
        i2t: Outcomes of the image queries, in ``image_ids`` order.
        t2i: Outcomes of the caption queries, in ``caption_ids`` order.
        ties: The tie rule the run reported its metrics with.
    """

    image_ids: Tensor
    caption_ids: Tensor
    caption_image_ids: Tensor
    i2t: QueryOutcomes
    t2i: QueryOutcomes
    ties: Ties = DEFAULT_TIES

    def save(self, path: str | Path) -> Path:
        """Write the queries to ``path`` (``.npz``; numpy appends the suffix when missing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "version": np.array(_QUERY_FILE_VERSION),
            "ties": np.array(self.ties),
            "image_ids": self.image_ids.cpu().numpy().astype(np.int64),
            "caption_ids": self.caption_ids.cpu().numpy().astype(np.int64),
            "caption_image_ids": self.caption_image_ids.cpu().numpy().astype(np.int64),
        }
        for direction, outcomes in (("i2t", self.i2t), ("t2i", self.t2i)):
            for name in ("ahead", "tied", "relevant_at_best"):
                arrays[f"{direction}_{name}"] = getattr(outcomes, name).cpu().numpy().astype(np.int32)
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> RankedQueries:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: If the file is not a query-outcome file of a known version (names the file).
        """
        with np.load(path) as data:
            version = int(data["version"]) if "version" in data else None
            if version != _QUERY_FILE_VERSION:
                raise ValueError(f"{path}: not a per-query retrieval file of version {_QUERY_FILE_VERSION}")

            def outcomes(direction: str) -> QueryOutcomes:
                return QueryOutcomes(
                    *(torch.from_numpy(data[f"{direction}_{n}"].astype(np.int64)) for n in _OUTCOME_FIELDS)
                )

            return cls(
                image_ids=torch.from_numpy(data["image_ids"]),
                caption_ids=torch.from_numpy(data["caption_ids"]),
                caption_image_ids=torch.from_numpy(data["caption_image_ids"]),
                i2t=outcomes("i2t"),
                t2i=outcomes("t2i"),
                ties=str(data["ties"]),  # type: ignore[arg-type]
            )


_OUTCOME_FIELDS = ("ahead", "tied", "relevant_at_best")


def _prepare_embeds(name: str, embeds: Tensor) -> Tensor:
    if not isinstance(embeds, Tensor) or embeds.ndim != 2 or not embeds.is_floating_point():
        shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be a 2-D floating-point tensor [N, D], got {shape}")
    embeds = embeds.detach().float()
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    # All-zero rows stay zero (F.normalize divides by max(norm, eps)); the ranking counts them as misses.
    return F.normalize(embeds, dim=1)


def _prepare_ids(name: str, ids: Tensor, rows: int, rows_name: str, device: torch.device) -> Tensor:
    if not isinstance(ids, Tensor):
        ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer tensor, got shape {tuple(ids.shape)}, dtype {ids.dtype}"
        )
    if ids.shape[0] != rows:
        raise ValueError(f"{name} has {ids.shape[0]} entries but {rows_name} has {rows} rows")
    return ids.detach().to(device=device, dtype=torch.long)


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    # A single-element list (one update, or the state after a DDP sync) needs no concatenated copy.
    if isinstance(state, list) and len(state) == 1:
        return state[0]
    return dim_zero_cat(state)


def _first_occurrences(name: str, ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each distinct id (ascending), the index of its first occurrence; and each row's group."""
    if ids.is_floating_point():
        raise RuntimeError(
            f"{name} arrived as {ids.dtype} after synchronisation. torchmetrics substitutes an empty "
            "float tensor for a process that never called update(); make sure every process sees "
            "at least one batch (a DistributedSampler guarantees this)."
        )
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first, inverse


def _take(values: Tensor, rows: Tensor) -> Tensor:
    # Skip the copy when the rows are already unique and in id order (the common single-process case).
    if rows.numel() == values.shape[0] and bool(
        (rows == torch.arange(rows.numel(), device=rows.device)).all()
    ):
        return values
    return values[rows]


def _check_duplicates_agree(
    name: str, ids: Tensor, values: Tensor, first: Tensor, inverse: Tensor, atol: float
) -> None:
    """Raise if rows sharing an id carry embeddings further apart than ``atol`` (max abs diff)."""
    if first.numel() == ids.numel():
        return
    diff = (values - values[first[inverse]]).abs().amax(dim=1)
    bad = diff > atol
    if bool(bad.any()):
        raise ValueError(
            f"{name} {_listed(torch.unique(ids[bad]))} arrived several times with different embeddings "
            f"(max abs difference {float(diff.max()):.3g} > duplicate_atol={atol}). Ids must identify "
            "samples uniquely across the whole evaluation set and all processes."
        )


class RetrievalMetrics(Metric):
    """Image-text retrieval R@K, mean R, rsum, ranks, tie counts and a collapse flag over an evaluation set.

    Call :meth:`update` with each evaluation batch: the images and captions it contains, their ids,
    and for each caption the id of its image. A caption's image does not have to be in the same
    batch; it only has to be seen at some point. :meth:`compute` then

    1. gathers the states of all processes (torchmetrics does this; states are ``cat``-reduced),
    2. removes duplicated samples by id (a ``DistributedSampler`` pads the last batch by repeating
       samples, and a pair-wise loader repeats an image once per caption), keeping the first copy
       and raising if two copies' embeddings differ by more than ``duplicate_atol`` or a caption id
       is attached to two different images,
    3. orders images and captions by id, so that every process and a single-process run rank exactly
       the same tensors,
    4. ranks every query (:func:`pefttune.metrics.functional.retrieval_outcomes`) and summarises the
       outcomes under the tie rule (:func:`~pefttune.metrics.functional.metrics_from_outcomes`: R@K,
       ranks, and how many queries tied), and
    5. measures whether the embeddings collapsed
       (:func:`~pefttune.metrics.functional.collapse_diagnostics`: ``image_spread``, ``text_spread``,
       ``image_effective_rank``, ``text_effective_rank`` and ``collapsed``, 1.0 or 0.0; a collapsed
       evaluation also warns).

    After :meth:`compute`, :attr:`last_queries` holds the per-query outcomes of that evaluation
    (:class:`RankedQueries`), for paired comparisons between models.

    Embeddings are L2-normalised (in float32) in :meth:`update`, whatever the caller did, because the
    ranking assumes cosine scores and a tower may hand over unnormalised projections; non-finite
    embeddings are rejected, and all-zero ones count as misses (with a warning giving their number).
    Pass *caption record* ids as ``text_ids``: in the data batches these are ``caption_ids``, not
    ``text_ids`` (which equal strings share).

    Under DDP every process must call :meth:`update` at least once before :meth:`compute`.

    Args:
        ks: Cut-offs K for R@K.
        chunk_size: Queries scored at a time when ranking (bounds memory, not the result).
        ties: Tie rule of :mod:`pefttune.metrics.functional`: ``"expected"`` (default; the mean over random
            orders of tied candidates), ``"pessimistic"`` or ``"optimistic"`` (flatters ties; for
            comparison only).
        collapse_spread: Total embedding variance below which the evaluation is flagged as collapsed.
        duplicate_atol: Largest max-abs difference tolerated between two normalised embeddings that
            share an id. The same sample embedded in two different batches may differ by rounding
            (more so under mixed precision); two different samples differ by far more.
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``compute_on_cpu``, ``process_group``).

    Example:
        >>> metric = RetrievalMetrics()
        >>> images = torch.eye(3)
        >>> metric.update(images, torch.tensor([10, 11, 12]), images, torch.tensor([0, 1, 2]),
        ...               torch.tensor([10, 11, 12]))
        >>> float(metric.compute()["i2t_R@1"])
        100.0
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    image_embeds: list[Tensor] | Tensor
    image_ids: list[Tensor] | Tensor
    text_embeds: list[Tensor] | Tensor
    text_ids: list[Tensor] | Tensor
    text_image_ids: list[Tensor] | Tensor

    def __init__(
        self,
        ks: Sequence[int] = DEFAULT_KS,
        chunk_size: int = 512,
        ties: Ties = DEFAULT_TIES,
        duplicate_atol: float = 1e-2,
        collapse_spread: float = DEFAULT_COLLAPSE_SPREAD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_chunk_size(chunk_size)
        _check_ties(ties)
        if not duplicate_atol >= 0:
            raise ValueError(f"duplicate_atol must be >= 0, got {duplicate_atol!r}")
        if not 0 <= collapse_spread <= 1:
            raise ValueError(f"collapse_spread must lie in [0, 1], got {collapse_spread!r}")
        self.ks = _normalise_ks(ks)
        self.chunk_size = chunk_size
        self.ties: Ties = ties
        self.duplicate_atol = float(duplicate_atol)
        self.collapse_spread = float(collapse_spread)
        #: Per-query outcomes of the last :meth:`compute` (None before the first).
        self.last_queries: RankedQueries | None = None
        for name in ("image_embeds", "image_ids", "text_embeds", "text_ids", "text_image_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_embeds: Tensor,
        image_ids: Tensor,
        text_embeds: Tensor,
        text_ids: Tensor,
        text_image_ids: Tensor,
    ) -> None:
        """Add a batch of images and captions.

        Either side may be empty (0 rows) when a batch carries only images or only captions.

        Args:
            image_embeds: Image embeddings [B_img, D] (normalised here).
            image_ids: Integer id of each image [B_img].
            text_embeds: Caption embeddings [B_txt, D] (normalised here).
            text_ids: Integer id of each caption record [B_txt], unique per caption in the dataset.
            text_image_ids: Id of the image each caption belongs to [B_txt].

        Raises:
            ValueError: On shape mismatches, non-integer ids, or NaN/inf embeddings (all-zero embeddings are
                accepted and count as misses).
        """
        images = _prepare_embeds("image_embeds", image_embeds)
        texts = _prepare_embeds("text_embeds", text_embeds)
        if images.shape[1] != texts.shape[1]:
            raise ValueError(
                f"image_embeds and text_embeds must have the same width, got {images.shape[1]} and "
                f"{texts.shape[1]}"
            )
        device = images.device
        # Validate everything before appending anything, so a rejected batch leaves no partial state.
        prepared = {
            "image_embeds": images,
            "image_ids": _prepare_ids("image_ids", image_ids, images.shape[0], "image_embeds", device),
            "text_embeds": texts.to(device),
            "text_ids": _prepare_ids("text_ids", text_ids, texts.shape[0], "text_embeds", device),
            "text_image_ids": _prepare_ids(
                "text_image_ids", text_image_ids, texts.shape[0], "text_embeds", device
            ),
        }
        for name, value in prepared.items():
            getattr(self, name).append(value)

    def _unique_images(self) -> tuple[Tensor, Tensor]:
        embeds, ids = _cat(self.image_embeds), _cat(self.image_ids)
        first, inverse = _first_occurrences("image_ids", ids)
        _check_duplicates_agree("image ids", ids, embeds, first, inverse, self.duplicate_atol)
        return _take(embeds, first), ids[first]

    def _unique_texts(self) -> tuple[Tensor, Tensor, Tensor]:
        embeds, ids = _cat(self.text_embeds), _cat(self.text_ids)
        owners = _cat(self.text_image_ids)
        first, inverse = _first_occurrences("text_ids", ids)
        conflict = owners != owners[first[inverse]]
        if bool(conflict.any()):
            raise ValueError(
                f"caption ids {_listed(torch.unique(ids[conflict]))} are attached to more than one image "
                "id. text_ids must be unique per caption record (the batch's caption_ids), not shared by "
                "equal strings."
            )
        _check_duplicates_agree("caption ids", ids, embeds, first, inverse, self.duplicate_atol)
        return _take(embeds, first), ids[first], owners[first]

    def update_from_batch(
        self, batch: Mapping[str, Tensor], image_embeds: Tensor, text_embeds: Tensor
    ) -> None:
        """:meth:`update` with the ids an evaluation batch carries, embeddings cast to float32.

        Args:
            batch: An evaluation batch with ``image_ids``, ``caption_ids`` and ``caption_image_ids``.
            image_embeds: The batch's image embeddings [B_img, D] (any float dtype, e.g. under autocast).
            text_embeds: The batch's caption embeddings [B_txt, D].
        """
        self.update(
            image_embeds.float(),
            batch["image_ids"],
            text_embeds.float(),
            batch["caption_ids"],
            batch["caption_image_ids"],
        )

    def compute(self) -> dict[str, Tensor]:
        """De-duplicate the accumulated samples and compute the retrieval metrics.

        Returns:
            The keys of :func:`pefttune.metrics.functional.retrieval_metrics`, as 0-dim float64 tensors
            (R@K in percent).

        Raises:
            RuntimeError: If no images or no captions were added.
            ValueError: On conflicting duplicates, an image without captions, or a caption whose image
                was never added.
        """
        if self._is_empty("image_embeds") or self._is_empty("text_embeds"):
            raise RuntimeError(
                "RetrievalMetrics.compute() needs at least one image and one caption; call update() first"
            )
        images, image_ids = self._unique_images()
        texts, caption_ids, text_image_ids = self._unique_texts()
        zero_images, zero_texts = count_zero_rows(images), count_zero_rows(texts)
        if zero_images or zero_texts:
            rank_zero_warn(
                f"RetrievalMetrics: {zero_images} of {images.shape[0]} image embeddings and {zero_texts} of "
                f"{texts.shape[0]} caption embeddings are all zero; they count as misses (worst rank), as "
                "docs/protocol.md defines"
            )
        i2t, t2i = retrieval_outcomes(images, image_ids, texts, text_image_ids, chunk_size=self.chunk_size)
        self.last_queries = RankedQueries(image_ids, caption_ids, text_image_ids, i2t, t2i, self.ties)
        values = metrics_from_outcomes(i2t, t2i, self.ks, self.ties)
        health = collapse_diagnostics(images, texts, spread_threshold=self.collapse_spread)
        if health["collapsed"]:
            rank_zero_warn(
                "RetrievalMetrics: the embeddings have collapsed (spread image "
                f"{health['image_spread']:.2g}, text {health['text_spread']:.2g}; effective rank image "
                f"{health['image_effective_rank']:.2g}, text {health['text_effective_rank']:.2g}); "
                f"{int(values['i2t_tied_queries'])} image and {int(values['t2i_tied_queries'])} caption "
                "queries tied. The retrieval numbers measure ties, not quality (docs/protocol.md)"
            )
        values.update(health)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}

    def _is_empty(self, name: str) -> bool:
        state = getattr(self, name)
        if isinstance(state, list):
            return sum(t.shape[0] for t in state) == 0
        return state.shape[0] == 0
