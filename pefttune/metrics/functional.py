"""Image-text retrieval metrics as pure tensor functions (no state, no distributed logic).

The protocol is the one of LAVIS and the DueT paper, for evaluation sets where an image has several
captions (COCO 5k and Flickr30k 1k have five):

* **Image -> text.** The candidates are all captions. An image's rank is the best (smallest) rank of any
  of its own captions, so R@K is the fraction of images with *at least one* of their captions in the
  top K (a hit rate, not information-retrieval recall).
* **Text -> image.** The candidates are all images. Each caption has exactly one relevant image.

**Ranks and ties.** The rank of a query is ``1 + (number of candidates whose score is strictly higher
than the best relevant candidate's score)`` (``ties="optimistic"``, the default). This is the position
of the first relevant candidate after a stable sort by descending score in which, among equal scores,
relevant candidates are listed before the others. With ``ties="pessimistic"`` ties are resolved against
the query: ``1 + (number of non-relevant candidates scoring at least as high as the best relevant
one)``. The two agree unless a relevant candidate ties with a non-relevant one, which happens with
exact duplicates (COCO contains identical captions of different images) or with collapsed
embeddings; a fully collapsed model gets R@1 = 100 under the optimistic rule and the worst possible
ranks under the pessimistic one. Sort-based code (``argsort``, ``topk``) orders ties in an
implementation-defined way, so on ties it can disagree with both rules.

**All-zero embeddings.** A zero vector scores exactly 0 against everything, so under the optimistic rule
it would tie its way to rank 1. A ReLU tower can legitimately output one (every channel of its pooled
features negative before the activation: fully fine-tuned EfficientNet-Lite0 did on two low-contrast
UCM images), so it is not an error; it counts as a miss. A query whose embedding is zero, or all of
whose relevant candidates have zero embeddings, gets the worst possible rank (``1 +`` the number of
non-relevant candidates), and a zero caption never serves as an image's best relevant caption. As a
non-relevant candidate a zero embedding keeps its score of 0. :class:`~pefttune.metrics.RetrievalMetrics`
warns with their count.

Neither rule depends on the order of the candidates, so the ranks do not depend on how an evaluation
set was sharded or concatenated, up to the floating-point rounding of the scores themselves, which a
matrix product may compute differently for different layouts (``RetrievalMetrics`` orders samples by id
so that every process ranks identical tensors).

**Memory.** Scores are computed ``chunk_size`` queries at a time: one ``chunk_size x N`` block of scores
exists at once and is counted in place, never the whole ``N_img x N_txt`` matrix. At COCO-5k scale
(25,000 captions) the default chunk of 512 is a 51 MB float32 block. All work happens on the device of
the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "Ties",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_retrieval",
]

Ties = Literal["optimistic", "pessimistic"]
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_TIES: tuple[str, ...] = ("optimistic", "pessimistic")
# How many offending ids an error message lists before eliding the rest.
_MAX_LISTED = 10


def _listed(values: Tensor) -> str:
    items = values.flatten().tolist()
    shown = ", ".join(str(v) for v in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        return f"[{shown}, ...] ({len(items)} in total)"
    return f"[{shown}]"


def _check_embeddings(name: str, embeds: Tensor) -> None:
    if not isinstance(embeds, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(embeds.shape)}")
    if not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {embeds.dtype}")
    if embeds.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(embeds.shape)}); nothing to rank")
    # A NaN compares false with everything, so it would silently give rank 1: refuse it.
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_comparable(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two embedding matrices to be scored against each other: same width, same device."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same width, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _check_ids(name: str, ids: Tensor, length: int, length_name: str) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.shape[0] != length:
        raise ValueError(f"{name} has {ids.shape[0]} entries but {length_name} has {length} rows")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _normalise_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
    return tuple(sorted(set(ks)))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision scores produce many spurious ties (and CPU half matmuls are slow): rank in float32
    # unless the caller already works in float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _owner_positions(image_ids: Tensor, text_image_ids: Tensor) -> Tensor:
    """Map each caption to the row of its image in ``image_ids``; validate the id relation."""
    sorted_ids, order = torch.sort(image_ids)
    if sorted_ids.numel() > 1:
        repeated = sorted_ids[1:] == sorted_ids[:-1]
        if bool(repeated.any()):
            raise ValueError(
                "image_ids must be unique, but these ids occur more than once: "
                f"{_listed(torch.unique(sorted_ids[1:][repeated]))}. Remove duplicates first "
                "(RetrievalMetrics does this for padded or gathered evaluation sets)."
            )
    # searchsorted gives the insertion point; an id is present iff the id stored there equals it.
    slot = torch.searchsorted(sorted_ids, text_image_ids).clamp_(max=sorted_ids.numel() - 1)
    found = sorted_ids[slot] == text_image_ids
    if not bool(found.all()):
        missing = (~found).nonzero().squeeze(1)
        raise ValueError(
            f"captions at positions {_listed(missing)} belong to image ids "
            f"{_listed(torch.unique(text_image_ids[missing]))} that are not among image_ids"
        )
    owner = order[slot]
    has_caption = torch.zeros(image_ids.numel(), dtype=torch.bool, device=image_ids.device)
    has_caption[owner] = True
    if not bool(has_caption.all()):
        raise ValueError(
            f"images without any caption: ids {_listed(image_ids[~has_caption])}. Every image needs "
            "at least one caption for image-to-text retrieval."
        )
    return owner


def _validated(
    image_embeds: Tensor, image_ids: Tensor, text_embeds: Tensor, text_image_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate retrieval inputs; return (images, captions, owner rows) ready for ranking."""
    _check_embeddings("image_embeds", image_embeds)
    _check_embeddings("text_embeds", text_embeds)
    _check_comparable("image_embeds", image_embeds, "text_embeds", text_embeds)
    _check_ids("image_ids", image_ids, image_embeds.shape[0], "image_embeds")
    _check_ids("text_image_ids", text_image_ids, text_embeds.shape[0], "text_embeds")
    device = image_embeds.device
    owner = _owner_positions(image_ids.to(device, torch.long), text_image_ids.to(device, torch.long))
    dtype = _compute_dtype(image_embeds, text_embeds)
    return image_embeds.to(dtype), text_embeds.to(dtype), owner


# Sums of 0/1 values in float32 are exact up to 2**24; count in column blocks no wider than that.
_EXACT_FLOAT_COUNT = 2**24


def _count_ahead(scores: Tensor, threshold: Tensor, inclusive: bool) -> Tensor:
    """Per row, the number of scores above ``threshold`` (or equal to it, if ``inclusive``).

    Destroys ``scores``: the comparison writes its 0/1 result into the score block itself, so counting
    needs no extra memory and is about three times faster than summing a boolean mask (which torch
    first converts to int64).
    """
    counts = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[1], _EXACT_FLOAT_COUNT):
        block = scores[:, start : start + _EXACT_FLOAT_COUNT]
        counts += (block.ge_(threshold) if inclusive else block.gt_(threshold)).sum(1).long()
    return counts


def _image_to_text_ranks(
    images: Tensor, texts: Tensor, owner: Tensor, chunk_size: int, ties: Ties, zero_texts: Tensor
) -> Tensor:
    n_img = images.shape[0]
    # Group captions by owning image so that the captions of a chunk of images form one slice.
    by_owner = torch.argsort(owner, stable=True)
    offsets = [0, *torch.bincount(owner, minlength=n_img).cumsum(0).tolist()]
    ranks = torch.empty(n_img, dtype=torch.long, device=images.device)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = images[start:stop] @ texts.T
        captions = by_owner[offsets[start] : offsets[stop]]
        rows = owner[captions] - start
        # The relevant scores come out of the same matmul as the candidates' scores, so a relevant
        # caption can never look "strictly higher" than itself through rounding.
        relevant = scores[rows, captions]
        # A zero caption is never an image's best relevant one (see "All-zero embeddings").
        relevant = relevant.masked_fill(zero_texts[captions], float("-inf"))
        best = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best.scatter_reduce_(0, rows, relevant, reduce="amax")
        if ties == "optimistic":
            ahead = _count_ahead(scores, best[:, None], inclusive=False)
        else:
            tied_relevant = torch.zeros_like(best, dtype=torch.long)
            tied_relevant.scatter_add_(0, rows, (relevant >= best[rows]).long())
            ahead = _count_ahead(scores, best[:, None], inclusive=True) - tied_relevant
        ranks[start:stop] = ahead + 1
        # Free this chunk's scores before the next matmul, so that two blocks never coexist.
        del scores
    return ranks


def _text_to_image_ranks(images: Tensor, texts: Tensor, owner: Tensor, chunk_size: int, ties: Ties) -> Tensor:
    n_txt = texts.shape[0]
    ranks = torch.empty(n_txt, dtype=torch.long, device=texts.device)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        scores = texts[start:stop] @ images.T
        best = scores.gather(1, owner[start:stop, None])
        ahead = _count_ahead(scores, best, inclusive=ties == "pessimistic")
        if ties == "pessimistic":
            # The relevant image itself satisfies ">=": do not count it.
            ahead -= 1
        ranks[start:stop] = ahead + 1
        # Free this chunk's scores before the next matmul, so that two blocks never coexist.
        del scores
    return ranks


def retrieval_ranks(
    image_embeds: Tensor,
    image_ids: Tensor,
    text_embeds: Tensor,
    text_image_ids: Tensor,
    *,
    chunk_size: int = 512,
    ties: Ties = "optimistic",
) -> tuple[Tensor, Tensor]:
    """Rank of the best relevant candidate for every query, in both directions.

    Scores are dot products, i.e. cosine similarities when the embeddings are L2-normalised (the
    caller's job here; :class:`~pefttune.metrics.RetrievalMetrics` normalises for you). Float16 and
    bfloat16 inputs are ranked in float32, float64 inputs in float64. See the module docstring for the
    rank definition and the two tie rules.

    Args:
        image_embeds: Image embeddings [N_img, D].
        image_ids: Unique integer id of each image [N_img].
        text_embeds: Caption embeddings [N_txt, D], on the same device as ``image_embeds``.
        text_image_ids: For each caption, the id of the image it describes [N_txt].
        chunk_size: Queries scored at a time; peak extra memory is about ``chunk_size x N`` scores.
        ties: ``"optimistic"`` (ties favour the relevant candidate) or ``"pessimistic"``.

    Returns:
        ``(i2t_ranks, t2i_ranks)``: ``torch.long`` tensors of shapes [N_img] and [N_txt] on the
        embeddings' device, in input order, 1-based (1 = a relevant item is ranked first).

    Raises:
        ValueError: On inconsistent shapes or devices, non-finite embeddings, duplicate image ids, an
            image without captions, a caption whose image id is not in ``image_ids``, or a bad
            ``chunk_size``/``ties``.
        TypeError: If embeddings are not floating point or ids are not integers.
    """
    _check_chunk_size(chunk_size)
    _check_ties(ties)
    images, texts, owner = _validated(image_embeds, image_ids, text_embeds, text_image_ids)
    zero_images, zero_texts = ~images.any(dim=1), ~texts.any(dim=1)
    i2t = _image_to_text_ranks(images, texts, owner, chunk_size, ties, zero_texts)
    t2i = _text_to_image_ranks(images, texts, owner, chunk_size, ties)
    if bool(zero_images.any()) or bool(zero_texts.any()):
        n_img, n_txt = images.shape[0], texts.shape[0]
        captions = torch.bincount(owner, minlength=n_img)
        live_captions = torch.bincount(owner[~zero_texts], minlength=n_img)
        missed = zero_images | (live_captions == 0)
        i2t[missed] = n_txt - captions[missed] + 1
        t2i[zero_texts | zero_images[owner]] = n_img
    return i2t, t2i


def count_zero_rows(embeds: Tensor) -> int:
    """How many rows of ``embeds`` are all zero (they count as misses, see the module docstring)."""
    return int((~embeds.any(dim=1)).sum())


def _median(ranks: Tensor) -> float:
    # Like numpy.median: the mean of the two middle values for an even count (torch.median would
    # return the lower one).
    values = torch.sort(ranks).values
    n = values.numel()
    if n % 2:
        return float(values[n // 2])
    return (float(values[n // 2 - 1]) + float(values[n // 2])) / 2.0


def metrics_from_ranks(
    i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Summarise per-query ranks into the reported retrieval metrics.

    Args:
        i2t_ranks: 1-based ranks of the image queries [N_img].
        t2i_ranks: 1-based ranks of the caption queries [N_txt].
        ks: Cut-offs K for R@K (deduplicated and sorted).

    Returns:
        A dict of Python floats: ``i2t_R@K`` and ``t2i_R@K`` for each K (percent, 0-100),
        ``i2t_mean_R`` and ``t2i_mean_R`` (mean of that direction's R@K, the figure DueT reports),
        ``rsum`` (sum of all R@K of both directions; with the default ks the usual sum of six),
        ``i2t_median_rank``, ``i2t_mean_rank``, ``t2i_median_rank`` and ``t2i_mean_rank``. The median
        of an even number of ranks is the mean of the two middle ones, as in ``numpy.median``.

    Raises:
        ValueError: If ``ks`` is empty or holds a non-positive K, or a rank tensor is empty or not 1-D.
    """
    ks = _normalise_ks(ks)
    out: dict[str, float] = {}
    means: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        if ranks.ndim != 1 or ranks.numel() == 0:
            raise ValueError(
                f"{direction} ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}"
            )
        n = ranks.numel()
        recalls = [100.0 * int((ranks <= k).sum()) / n for k in ks]
        out.update({f"{direction}_R@{k}": r for k, r in zip(ks, recalls, strict=True)})
        means[direction] = sum(recalls) / len(recalls)
    out["i2t_mean_R"] = means["i2t"]
    out["t2i_mean_R"] = means["t2i"]
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        out[f"{direction}_median_rank"] = _median(ranks)
        out[f"{direction}_mean_rank"] = float(ranks.double().mean())
    return out


def retrieval_metrics(
    image_embeds: Tensor,
    image_ids: Tensor,
    text_embeds: Tensor,
    text_image_ids: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 512,
    ties: Ties = "optimistic",
) -> dict[str, float]:
    """Image-text retrieval metrics (R@K, mean R, rsum, median and mean rank) for both directions.

    Equivalent to :func:`retrieval_ranks` followed by :func:`metrics_from_ranks`; see those for the
    protocol, the tie rules and the meaning of each key. The embeddings are expected to be
    L2-normalised; they are not normalised here.

    Args:
        image_embeds: Image embeddings [N_img, D].
        image_ids: Unique integer id of each image [N_img].
        text_embeds: Caption embeddings [N_txt, D].
        text_image_ids: For each caption, the id of the image it describes [N_txt].
        ks: Cut-offs K for R@K. A K larger than the number of candidates gives 100.
        chunk_size: Queries scored at a time (bounds memory, does not change the result).
        ties: ``"optimistic"`` or ``"pessimistic"`` tie rule.

    Returns:
        A dict of Python floats; R@K values are percentages (0-100).

    Raises:
        ValueError: On invalid inputs (see :func:`retrieval_ranks`) or invalid ``ks``.
        TypeError: If embeddings are not floating point or ids are not integers.
    """
    ks = _normalise_ks(ks)
    i2t, t2i = retrieval_ranks(
        image_embeds, image_ids, text_embeds, text_image_ids, chunk_size=chunk_size, ties=ties
    )
    return metrics_from_ranks(i2t, t2i, ks)


def topk_retrieval(
    query_embeds: Tensor, gallery_embeds: Tensor, k: int, *, chunk_size: int = 512
) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring gallery items for each query, computed ``chunk_size`` queries at a time.

    Use images as queries and captions as the gallery for image-to-text (or the reverse), e.g. to
    draw retrieval examples. Scores are dot products (cosine for L2-normalised inputs); half
    precision is scored in float32. Among equal scores the order is the one ``torch.topk`` yields,
    which is implementation-defined.

    Args:
        query_embeds: Query embeddings [N_q, D].
        gallery_embeds: Gallery embeddings [N_g, D], on the same device.
        k: How many items to return per query; capped at ``N_g``.
        chunk_size: Queries scored at a time.

    Returns:
        ``(scores, indices)``, both [N_q, min(k, N_g)], sorted by descending score; ``indices`` are
        rows of ``gallery_embeds``.

    Raises:
        ValueError: On shape/device mismatches, non-finite embeddings, or non-positive ``k``/``chunk_size``.
        TypeError: If embeddings are not floating point.
    """
    _check_embeddings("query_embeds", query_embeds)
    _check_embeddings("gallery_embeds", gallery_embeds)
    _check_chunk_size(chunk_size)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_comparable("query_embeds", query_embeds, "gallery_embeds", gallery_embeds)
    dtype = _compute_dtype(query_embeds, gallery_embeds)
    queries, gallery = query_embeds.to(dtype), gallery_embeds.to(dtype)
    k = min(k, gallery.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        top = torch.topk(queries[start : start + chunk_size] @ gallery.T, k, dim=1, largest=True, sorted=True)
        scores.append(top.values)
        indices.append(top.indices)
    return torch.cat(scores), torch.cat(indices)
