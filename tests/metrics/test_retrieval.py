"""Tests of the retrieval metrics against a brute-force reference, torchmetrics, and under DDP."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.retrieval import RetrievalHitRate

from pefttune.metrics import (
    RankedQueries,
    RetrievalMetrics,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    topk_retrieval,
)


def make_data(
    seed: int,
    n_img: int = 23,
    dim: int = 16,
    max_captions: int = 7,
    quantised: bool = False,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Images with 1..max_captions captions each, in shuffled caption order, with arbitrary ids.

    ``quantised`` draws entries from {-2..2}/4 (exact in binary floating point, so every dot product
    is exact whatever the summation order) and plants exact duplicates: many scores tie.
    """
    g = torch.Generator().manual_seed(seed)
    n_caps = torch.randint(1, max_captions + 1, (n_img,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_img), n_caps)
    owner = owner[torch.randperm(owner.numel(), generator=g)]
    image_ids = torch.randperm(50 * n_img, generator=g)[:n_img] + 1000
    if quantised:
        images = torch.randint(-2, 3, (n_img, dim), generator=g).to(dtype) / 4
        texts = images[owner] + torch.randint(-1, 2, (owner.numel(), dim), generator=g).to(dtype) / 4
        images[1] = images[0]  # two identical images
        texts[owner == 2] = texts[owner == 3][0]  # image 2's captions equal one of image 3's
    else:
        images = F.normalize(torch.randn(n_img, dim, generator=g, dtype=dtype), dim=1)
        noise = torch.randn(owner.numel(), dim, generator=g, dtype=dtype)
        texts = F.normalize(images[owner] + 0.9 * noise, dim=1)
    return {
        "image_embeds": images,
        "image_ids": image_ids,
        "text_embeds": texts,
        "text_image_ids": image_ids[owner],
        "owner": owner,
    }


def _reference_rank(scores: list[float], relevant: list[bool], ties: str) -> int:
    # Stable sort by descending score of a candidate list in which relevant items come first
    # (optimistic) or last (pessimistic): the tie rule is then decided by the stable order alone.
    listed = sorted(
        range(len(scores)), key=lambda j: (not relevant[j]) if ties == "optimistic" else relevant[j]
    )
    ordered = sorted(listed, key=lambda j: -scores[j])
    return 1 + next(pos for pos, j in enumerate(ordered) if relevant[j])


def reference_ranks(
    data: dict[str, torch.Tensor], ties: str = "optimistic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: the full score matrix and a Python sort per query."""
    scores = (data["image_embeds"] @ data["text_embeds"].T).tolist()
    owner = data["owner"].tolist()
    n_img, n_txt = len(scores), len(owner)
    i2t = [_reference_rank(scores[i], [owner[j] == i for j in range(n_txt)], ties) for i in range(n_img)]
    t2i = [
        _reference_rank([scores[i][j] for i in range(n_img)], [owner[j] == i for i in range(n_img)], ties)
        for j in range(n_txt)
    ]
    return torch.tensor(i2t), torch.tensor(t2i)


def _reference_counts(scores: list[float], relevant: list[bool]) -> tuple[int, int, int]:
    """(non-relevant above the best relevant, non-relevant equal to it, relevant equal to it)."""
    best = max(s for s, rel in zip(scores, relevant, strict=True) if rel)
    ahead = sum(1 for s, rel in zip(scores, relevant, strict=True) if not rel and s > best)
    tied = sum(1 for s, rel in zip(scores, relevant, strict=True) if not rel and s == best)
    at_best = sum(1 for s, rel in zip(scores, relevant, strict=True) if rel and s == best)
    return ahead, tied, at_best


def _first_relevant_distribution(tied: int, at_best: int) -> list[float]:
    """P(the first relevant item is at position p of the tied block), p = 1..tied+1, by a product formula."""
    probabilities = []
    none_yet = 1.0
    for position in range(tied + 1):
        remaining = tied + at_best - position
        probabilities.append(none_yet * at_best / remaining)
        none_yet *= (tied - position) / remaining
    return probabilities


def reference_expected(data: dict[str, torch.Tensor]) -> dict[str, tuple[list[float], list[list[float]]]]:
    """Expected rule by brute force: per direction, the expected ranks and per-K hit probabilities (K 1..60)."""
    scores = (data["image_embeds"] @ data["text_embeds"].T).tolist()
    owner = data["owner"].tolist()
    n_img, n_txt = len(scores), len(owner)
    queries = {
        "i2t": [(scores[i], [owner[j] == i for j in range(n_txt)]) for i in range(n_img)],
        "t2i": [
            ([scores[i][j] for i in range(n_img)], [owner[j] == i for i in range(n_img)])
            for j in range(n_txt)
        ],
    }
    out = {}
    for direction, items in queries.items():
        ranks, hits = [], []
        for row, relevant in items:
            ahead, tied, at_best = _reference_counts(row, relevant)
            distribution = _first_relevant_distribution(tied, at_best)
            ranks.append(sum((ahead + 1 + p) * q for p, q in enumerate(distribution)))
            hits.append(
                [sum(q for p, q in enumerate(distribution) if ahead + 1 + p <= k) for k in range(1, 61)]
            )
        out[direction] = (ranks, hits)
    return out


def reference_metrics(i2t: torch.Tensor, t2i: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for name, ranks in (("i2t", i2t.numpy()), ("t2i", t2i.numpy())):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * float(np.mean(ranks <= k))
        out[f"{name}_mean_R"] = float(np.mean([out[f"{name}_R@{k}"] for k in ks]))
        out[f"{name}_median_rank"] = float(np.median(ranks))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def _args(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return data["image_embeds"], data["image_ids"], data["text_embeds"], data["text_image_ids"]


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bruteforce_reference(seed: int, quantised: bool, ties: str) -> None:
    data = make_data(seed, quantised=quantised)
    ks = (1, 3, 5, 10)
    i2t, t2i = retrieval_ranks(*_args(data), chunk_size=4, ties=ties)
    ref_i2t, ref_t2i = reference_ranks(data, ties)
    assert torch.equal(i2t, ref_i2t)
    assert torch.equal(t2i, ref_t2i)
    got = retrieval_metrics(*_args(data), ks=ks, chunk_size=4, ties=ties)
    expected = reference_metrics(ref_i2t, ref_t2i, ks)
    assert got.keys() == {*expected, "i2t_tied_queries", "t2i_tied_queries"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key
    # A query tied exactly when the two fixed rules disagree on it.
    opt, pess = reference_ranks(data, "optimistic"), reference_ranks(data, "pessimistic")
    assert got["i2t_tied_queries"] == int((opt[0] != pess[0]).sum())
    assert got["t2i_tied_queries"] == int((opt[1] != pess[1]).sum())
    if quantised:
        # The planted duplicates must create relevant/non-relevant ties, or the tie rules are untested.
        other_i2t, other_t2i = reference_ranks(data, "pessimistic" if ties == "optimistic" else "optimistic")
        assert not (torch.equal(ref_i2t, other_i2t) and torch.equal(ref_t2i, other_t2i))


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_rule_matches_bruteforce_reference(seed: int, quantised: bool) -> None:
    data = make_data(seed, quantised=quantised)
    reference = reference_expected(data)
    ranks = retrieval_ranks(*_args(data), chunk_size=4, ties="expected")
    ks = (1, 3, 5, 10)
    got = retrieval_metrics(*_args(data), ks=ks, chunk_size=4, ties="expected")
    for direction, ours in zip(("i2t", "t2i"), ranks, strict=True):
        ref_ranks, ref_hits = reference[direction]
        assert ours.dtype == torch.float64
        assert ours.tolist() == pytest.approx(ref_ranks, rel=1e-12)
        for k in ks:
            expected = 100.0 * float(np.mean([hits[k - 1] for hits in ref_hits]))
            assert got[f"{direction}_R@{k}"] == pytest.approx(expected, rel=1e-9, abs=1e-9), (direction, k)
        assert got[f"{direction}_mean_rank"] == pytest.approx(float(np.mean(ref_ranks)), rel=1e-12)
        assert got[f"{direction}_median_rank"] == pytest.approx(float(np.median(ref_ranks)), rel=1e-12)
    if quantised:
        # Ties exist, so the expected rule lies strictly between the fixed ones somewhere.
        opt = retrieval_metrics(*_args(data), ks=ks, ties="optimistic")
        pess = retrieval_metrics(*_args(data), ks=ks, ties="pessimistic")
        assert pess["rsum"] < got["rsum"] < opt["rsum"]


def test_expected_rule_equals_the_average_over_every_order_of_the_ties() -> None:
    # One image query, 3 captions of its own tied with 4 captions of other images, 2 captions strictly
    # above: enumerate all orders of the 7 tied captions and average the hits and ranks.
    import itertools

    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0]] * 7 + [[2.0, 0.0]] * 2 + [[0.0, 1.0]])
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    i2t, _ = retrieval_ranks(images, torch.arange(2), texts, owner, ties="expected")
    got = retrieval_metrics(images, torch.arange(2), texts, owner, ks=(1, 3, 4, 5, 10), ties="expected")
    orders = list(itertools.permutations([True] * 3 + [False] * 4))
    firsts = [2 + order.index(True) + 1 for order in orders]
    assert float(i2t[0]) == pytest.approx(float(np.mean(firsts)))  # 3 + 4 / 4 = 4
    assert float(i2t[0]) == pytest.approx(4.0)
    for k in (1, 3, 4, 5, 10):
        hit = float(np.mean([first <= k for first in firsts]))
        # Image 1's caption scores 1, above nothing: a hit at every K.
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * (hit + 1) / 2), k
    assert got["i2t_tied_queries"] == 1.0


def test_tie_rules_on_hand_computed_example() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    image_ids = torch.tensor([7, 3])
    text_image_ids = torch.tensor([7, 3, 3])
    # Image 7: its caption scores 1, caption 1 (of image 3) also scores 1 -> a tie.
    # Caption 1: images 7 and 3 both score 1 -> a tie with its own image 3.
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids, ties="optimistic")
    assert i2t.tolist() == [1, 1]
    assert t2i.tolist() == [1, 1, 1]
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids, ties="pessimistic")
    assert i2t.tolist() == [2, 1]
    assert t2i.tolist() == [1, 2, 1]
    # The default: a coin flip between the two tied candidates.
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids)
    assert i2t.tolist() == [1.5, 1.0]
    assert t2i.tolist() == [1.0, 1.5, 1.0]
    got = retrieval_metrics(images, image_ids, texts, text_image_ids, ks=(1,))
    assert got["i2t_R@1"] == 75.0 and got["t2i_R@1"] == pytest.approx(100 * 2.5 / 3)
    assert got["i2t_tied_queries"] == 1.0 and got["t2i_tied_queries"] == 1.0


def test_collapsed_embeddings() -> None:
    n_caps = torch.tensor([1, 3, 2, 5])
    text_image_ids = torch.repeat_interleave(torch.arange(4), n_caps)
    images, texts = torch.ones(4, 8), torch.ones(int(n_caps.sum()), 8)
    i2t, t2i = retrieval_ranks(images, torch.arange(4), texts, text_image_ids, ties="optimistic")
    assert i2t.eq(1).all() and t2i.eq(1).all()
    i2t, t2i = retrieval_ranks(images, torch.arange(4), texts, text_image_ids, ties="pessimistic")
    assert i2t.tolist() == (1 + n_caps.sum() - n_caps).tolist()
    assert t2i.eq(4).all()
    # The default scores a collapsed model at chance, never at 100.
    got = retrieval_metrics(images, torch.arange(4), texts, text_image_ids, ks=(1,))
    n_txt = int(n_caps.sum())
    assert got["i2t_R@1"] == pytest.approx(100 * float((n_caps / n_txt).mean()))
    assert got["t2i_R@1"] == pytest.approx(25.0)
    assert got["i2t_tied_queries"] == 4 and got["t2i_tied_queries"] == n_txt


def test_k_larger_than_candidate_count() -> None:
    data = make_data(5, n_img=3, max_captions=2)
    ks = (1, 2, 4, 50)
    got = retrieval_metrics(*_args(data), ks=ks)
    expected = reference_metrics(*reference_ranks(data), ks)
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=0)
    assert got["i2t_R@50"] == 100.0 and got["t2i_R@50"] == 100.0
    # With 3 images, t2i R@4 already covers every candidate.
    assert got["t2i_R@4"] == 100.0


def test_default_keys_and_units() -> None:
    got = retrieval_metrics(*_args(make_data(3)))
    assert list(got) == [
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        "i2t_mean_R",
        "t2i_mean_R",
        "rsum",
        "i2t_median_rank",
        "i2t_mean_rank",
        "t2i_median_rank",
        "t2i_mean_rank",
        "i2t_tied_queries",
        "t2i_tied_queries",
    ]
    assert all(isinstance(v, float) for v in got.values())
    assert got["i2t_mean_R"] == pytest.approx((got["i2t_R@1"] + got["i2t_R@5"] + got["i2t_R@10"]) / 3)
    assert got["rsum"] == pytest.approx(sum(got[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_median_of_even_count_averages_the_middle_ranks() -> None:
    got = metrics_from_ranks(torch.tensor([1, 2, 4, 9]), torch.tensor([3, 1, 2]), ks=(1,))
    assert got["i2t_median_rank"] == 3.0
    assert got["t2i_median_rank"] == 2.0
    assert got["i2t_mean_rank"] == 4.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shift", [0.0, -10.0])
def test_matches_torchmetrics_hit_rate(seed: int, shift: float) -> None:
    # Continuous random scores: no ties, where torchmetrics' topk order would be implementation-defined.
    # A shift below zero checks that nothing filters non-positive scores (RetrievalRecall would).
    data = make_data(seed, n_img=20, dim=8, dtype=torch.float32)
    ours = retrieval_metrics(*_args(data), chunk_size=6)
    scores = data["image_embeds"] @ data["text_embeds"].T + shift
    owner = data["owner"]
    n_img, n_txt = scores.shape
    relevant = owner[None, :] == torch.arange(n_img)[:, None]
    for k in (1, 5, 10):
        i2t = RetrievalHitRate(top_k=k)(
            scores.flatten(),
            relevant.flatten(),
            indexes=torch.arange(n_img)[:, None].expand(n_img, n_txt).flatten(),
        )
        t2i = RetrievalHitRate(top_k=k)(
            scores.T.flatten(),
            relevant.T.flatten(),
            indexes=torch.arange(n_txt)[:, None].expand(n_txt, n_img).flatten(),
        )
        # Compare hit counts: exact, and immune to float32 rounding of torchmetrics' mean.
        assert round(float(i2t) * n_img) == round(ours[f"i2t_R@{k}"] * n_img / 100)
        assert round(float(t2i) * n_txt) == round(ours[f"t2i_R@{k}"] * n_txt / 100)
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * float(i2t), abs=1e-4)
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * float(t2i), abs=1e-4)


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_chunk_size_invariance(quantised: bool, ties: str) -> None:
    data = make_data(11, n_img=30, quantised=quantised, dtype=torch.float32)
    results = [retrieval_ranks(*_args(data), chunk_size=c, ties=ties) for c in (1, 7, 10**9)]
    for i2t, t2i in results[1:]:
        assert torch.equal(i2t, results[0][0])
        assert torch.equal(t2i, results[0][1])
    metrics = [retrieval_metrics(*_args(data), chunk_size=c, ties=ties) for c in (1, 7, 10**9)]
    assert metrics[0] == metrics[1] == metrics[2]


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_counting_in_column_blocks(monkeypatch: pytest.MonkeyPatch, ties: str) -> None:
    # Counts are summed in column blocks of at most 2**24 (exact float32 sums); shrink the block so that
    # the multi-block path runs, including a ragged last block.
    from pefttune.metrics import functional

    data = make_data(12, quantised=True)
    expected = reference_ranks(data, ties)
    monkeypatch.setattr(functional, "_EXACT_FLOAT_COUNT", 3)
    i2t, t2i = retrieval_ranks(*_args(data), chunk_size=5, ties=ties)
    assert torch.equal(i2t, expected[0]) and torch.equal(t2i, expected[1])


def test_ranks_follow_a_permutation_of_the_inputs() -> None:
    data = make_data(4, quantised=True)
    i2t, t2i = retrieval_ranks(*_args(data))
    g = torch.Generator().manual_seed(0)
    p_img = torch.randperm(len(i2t), generator=g)
    p_txt = torch.randperm(len(t2i), generator=g)
    i2t_p, t2i_p = retrieval_ranks(
        data["image_embeds"][p_img],
        data["image_ids"][p_img],
        data["text_embeds"][p_txt],
        data["text_image_ids"][p_txt],
    )
    assert torch.equal(i2t_p, i2t[p_img])
    assert torch.equal(t2i_p, t2i[p_txt])


def test_half_precision_inputs_are_ranked_in_float32() -> None:
    data = make_data(6, quantised=True, dtype=torch.float32)
    full = retrieval_ranks(*_args(data))
    half = retrieval_ranks(
        data["image_embeds"].half(), data["image_ids"], data["text_embeds"].bfloat16(), data["text_image_ids"]
    )
    # The quantised values are exact in both half formats, so the ranks must not change.
    assert torch.equal(full[0], half[0]) and torch.equal(full[1], half[1])


def test_topk_retrieval() -> None:
    data = make_data(8, n_img=12, dtype=torch.float32)
    queries, gallery = data["image_embeds"], data["text_embeds"]
    scores, indices = topk_retrieval(queries, gallery, 5, chunk_size=5)
    full = queries @ gallery.T
    expected = torch.topk(full, 5, dim=1)
    assert indices.shape == (12, 5)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(scores, expected.values)
    assert torch.allclose(full.gather(1, indices), scores)
    # Consistent with the ranks: an image's rank is <= 5 exactly when one of its captions is returned.
    i2t, _ = retrieval_ranks(*_args(data))
    hit = (data["owner"][indices] == torch.arange(12)[:, None]).any(1)
    assert torch.equal(hit, i2t <= 5)
    # k is capped at the gallery size.
    scores, indices = topk_retrieval(gallery, queries, 100, chunk_size=3)
    assert indices.shape == (gallery.shape[0], 12)
    assert torch.equal(indices.sort(1).values, torch.arange(12).expand(gallery.shape[0], 12))


def _valid() -> dict[str, torch.Tensor]:
    return {
        "image_embeds": torch.eye(3),
        "image_ids": torch.tensor([0, 1, 2]),
        "text_embeds": torch.eye(3)[[0, 1, 2, 2]],
        "text_image_ids": torch.tensor([0, 1, 2, 2]),
    }


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"image_embeds": torch.ones(3)}, ValueError, "image_embeds must be 2-D"),
        ({"text_embeds": torch.ones(4, 5)}, ValueError, "same width"),
        ({"image_ids": torch.tensor([0, 1])}, ValueError, "image_ids has 2 entries but image_embeds has 3"),
        ({"text_image_ids": torch.tensor([0, 1, 2])}, ValueError, "text_image_ids has 3 entries"),
        ({"text_image_ids": torch.tensor([0, 1, 2, 9])}, ValueError, r"belong to image ids \[9\]"),
        (
            {"text_image_ids": torch.tensor([0, 1, 1, 1])},
            ValueError,
            r"images without any caption: ids \[2\]",
        ),
        ({"image_ids": torch.tensor([0, 1, 1])}, ValueError, r"image_ids must be unique.*\[1\]"),
        ({"image_ids": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "image_ids must be an integer tensor"),
        ({"image_embeds": torch.eye(3, dtype=torch.long)}, TypeError, "floating-point"),
        ({"text_embeds": torch.full((4, 3), float("nan"))}, ValueError, "NaN or infinite"),
        (
            {"image_embeds": torch.empty(0, 3), "image_ids": torch.empty(0, dtype=torch.long)},
            ValueError,
            "empty",
        ),
    ],
)
def test_validation_errors(change: dict[str, torch.Tensor], error: type[Exception], message: str) -> None:
    inputs = {**_valid(), **change}
    with pytest.raises(error, match=message):
        retrieval_metrics(**inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": ()}, "at least one K"),
        ({"ks": (1, 0)}, "positive integer"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ties": "random"}, "ties must be one of"),
    ],
)
def test_option_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**_valid(), **kwargs)


# ----------------------------------------------------------------------------- the Metric


def _metric_args(
    data: dict[str, torch.Tensor], rows: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    text_ids = torch.arange(data["text_embeds"].shape[0]) * 3 + 100  # caption record ids
    return (
        data["image_embeds"][rows],
        data["image_ids"][rows],
        data["text_embeds"][caps],
        text_ids[caps],
        data["text_image_ids"][caps],
    )


def _all(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return _metric_args(data, torch.arange(data["image_ids"].numel()), torch.arange(data["owner"].numel()))


def test_metric_over_batches_equals_functional() -> None:
    data = make_data(21, dtype=torch.float32)
    n_img, n_txt = data["image_ids"].numel(), data["owner"].numel()
    metric = RetrievalMetrics(ks=(1, 5, 10), chunk_size=5)
    # Images and captions arrive in different, uneven batches (some batches carry no image at all).
    img_bounds = [0, 5, 5, 12, n_img]
    txt_bounds = [0, 1, 40, 41, n_txt]
    for a, b, c, d in zip(img_bounds, img_bounds[1:], txt_bounds, txt_bounds[1:], strict=False):
        metric.update(*_metric_args(data, torch.arange(a, b), torch.arange(c, d)))
    got = metric.compute()
    expected = retrieval_metrics(*_args(data))
    assert got.keys() == {*expected, *HEALTH_KEYS}
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-12, abs=0), key


def test_metric_normalises_its_inputs() -> None:
    data = make_data(22, dtype=torch.float32)
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    scale = torch.rand(images.shape[0], 1) * 10 + 0.1
    metric = RetrievalMetrics()
    metric.update(images * scale, image_ids, texts * 3, text_ids, text_image_ids)
    reference = RetrievalMetrics()
    reference.update(images, image_ids, texts, text_ids, text_image_ids)
    got, expected = metric.compute(), reference.compute()
    assert {k: v for k, v in got.items() if k not in HEALTH_KEYS} == {
        k: v for k, v in expected.items() if k not in HEALTH_KEYS
    }
    for key in HEALTH_KEYS:
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-5), key


HEALTH_KEYS = ("image_spread", "text_spread", "image_effective_rank", "text_effective_rank", "collapsed")


def test_metric_flags_a_collapsed_model_and_scores_it_at_chance() -> None:
    # Every image and caption embeds to (almost) the same vector: 10 images, 3 captions each.
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    images = direction + 1e-4 * torch.randn(10, 16, generator=g)
    texts = direction + 1e-4 * torch.randn(30, 16, generator=g)
    ids, owners = torch.arange(10), torch.arange(10).repeat_interleave(3)
    metric = RetrievalMetrics(ks=(1,))
    metric.update(images, ids, texts, torch.arange(30), owners)
    with pytest.warns(UserWarning, match="collapsed"):
        values = metric.compute()
    assert float(values["collapsed"]) == 1.0
    assert float(values["image_spread"]) < 1e-6 and float(values["text_spread"]) < 1e-6
    # Not a tie in floating point, but no better than chance either way: R@1 is nowhere near 100.
    assert float(values["t2i_R@1"]) < 50
    # An exactly collapsed model: every query tied, R@1 at chance (1 in 10), never 100.
    metric = RetrievalMetrics(ks=(1,))
    metric.update(direction.expand(10, 16), ids, direction.expand(30, 16), torch.arange(30), owners)
    with pytest.warns(UserWarning, match="30 caption queries tied"):
        values = metric.compute()
    assert float(values["collapsed"]) == 1.0
    assert float(values["i2t_R@1"]) == pytest.approx(10.0) and float(values["t2i_R@1"]) == pytest.approx(10.0)
    assert float(values["i2t_tied_queries"]) == 10 and float(values["t2i_tied_queries"]) == 30
    # The optimistic rule would have called it perfect.
    optimistic = RetrievalMetrics(ks=(1,), ties="optimistic")
    optimistic.update(direction.expand(10, 16), ids, direction.expand(30, 16), torch.arange(30), owners)
    with pytest.warns(UserWarning, match="collapsed"):
        assert float(optimistic.compute()["i2t_R@1"]) == 100.0


def test_healthy_embeddings_are_not_flagged() -> None:
    data = make_data(3, n_img=40, dim=32, dtype=torch.float32)
    metric = RetrievalMetrics()
    metric.update(*_all(data))
    values = metric.compute()
    assert float(values["collapsed"]) == 0.0
    assert 0.5 < float(values["image_spread"]) <= 1.0 + 1e-6
    assert float(values["image_effective_rank"]) > 10


def test_dimensional_collapse_is_flagged() -> None:
    # Items differ, but only along one direction (+a or -a): large spread, effective rank 1.
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(16, generator=g), dim=0)
    signs = torch.tensor([1.0, -1.0]).repeat(10)[:, None]
    images = signs * a + 1e-5 * torch.randn(20, 16, generator=g)
    texts = images.repeat_interleave(2, dim=0) + 1e-5 * torch.randn(40, 16, generator=g)
    metric = RetrievalMetrics(ks=(1,))
    metric.update(images, torch.arange(20), texts, torch.arange(40), torch.arange(20).repeat_interleave(2))
    with pytest.warns(UserWarning, match="collapsed"):
        values = metric.compute()
    assert float(values["image_effective_rank"]) < 1.5 and float(values["image_spread"]) > 0.01
    assert float(values["collapsed"]) == 1.0


def test_metric_keeps_per_query_outcomes_and_they_round_trip(tmp_path: Path) -> None:
    data = make_data(12, quantised=True)
    metric = RetrievalMetrics(ks=(1, 5))
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    metric.update(images[order], image_ids[order], texts, text_ids, text_image_ids)
    values = metric.compute()
    queries = metric.last_queries
    assert queries is not None and queries.ties == "expected"
    assert torch.equal(queries.image_ids, torch.sort(image_ids).values)
    assert torch.equal(queries.caption_ids, torch.sort(text_ids).values)
    for k in (1, 5):
        assert 100 * float(queries.i2t.hit_rate(k).mean()) == pytest.approx(float(values[f"i2t_R@{k}"]))
        assert 100 * float(queries.t2i.hit_rate(k).mean()) == pytest.approx(float(values[f"t2i_R@{k}"]))
    path = queries.save(tmp_path / "ranks.npz")
    loaded = RankedQueries.load(path)
    assert loaded.ties == "expected"
    assert torch.equal(loaded.image_ids, queries.image_ids) and torch.equal(
        loaded.caption_ids, queries.caption_ids
    )
    for name in ("ahead", "tied", "relevant_at_best"):
        assert torch.equal(getattr(loaded.i2t, name), getattr(queries.i2t, name))
        assert torch.equal(getattr(loaded.t2i, name), getattr(queries.t2i, name))
    (tmp_path / "other.npz").write_bytes(b"")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match=r"other\.npz: not a per-query retrieval file"):
        RankedQueries.load(tmp_path / "other.npz")


def test_padded_duplicates_do_not_change_the_result() -> None:
    data = make_data(23, dtype=torch.float32)
    once = RetrievalMetrics()
    once.update(*_all(data))
    twice = RetrievalMetrics()
    twice.update(*_all(data))
    # A DistributedSampler pads by repeating the first samples.
    twice.update(*_metric_args(data, torch.arange(3), torch.arange(4)))
    # A pair-wise loader repeats each image once per caption.
    twice.update(*_metric_args(data, data["owner"][:10], torch.arange(10)))
    expected = once.compute()
    got = twice.compute()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # The duplicates really were there: without de-duplication the image ids would collide.
    assert torch.cat(twice.image_ids).numel() > data["image_ids"].numel()


def test_duplicates_with_rounding_differences_are_accepted() -> None:
    data = make_data(24, dtype=torch.float32)
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    metric = RetrievalMetrics(duplicate_atol=1e-3)
    metric.update(images, image_ids, texts, text_ids, text_image_ids)
    metric.update(images[:2] + 1e-5, image_ids[:2], texts[:2] - 1e-5, text_ids[:2], text_image_ids[:2])
    metric.compute()


def test_conflicting_image_duplicates_raise() -> None:
    data = make_data(25, dtype=torch.float32)
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    metric = RetrievalMetrics()
    metric.update(images, image_ids, texts, text_ids, text_image_ids)
    # Image 0's id arrives again with image 1's embedding.
    metric.update(images[1:2], image_ids[:1], texts[:0], text_ids[:0], text_image_ids[:0])
    with pytest.raises(ValueError, match=re.escape(f"image ids [{int(image_ids[0])}] arrived several times")):
        metric.compute()


def test_conflicting_caption_duplicates_raise() -> None:
    data = make_data(26, dtype=torch.float32)
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    metric = RetrievalMetrics()
    metric.update(images, image_ids, texts, text_ids, text_image_ids)
    metric.update(images[:0], image_ids[:0], texts[1:2], text_ids[:1], text_image_ids[:1])
    with pytest.raises(
        ValueError, match=r"caption ids \[\d+\] arrived several times with different embeddings"
    ):
        metric.compute()


def test_caption_id_attached_to_two_images_raises() -> None:
    data = make_data(27, dtype=torch.float32)
    images, image_ids, texts, text_ids, text_image_ids = _all(data)
    other = image_ids[(image_ids != text_image_ids[0]).nonzero()[0]]
    metric = RetrievalMetrics()
    metric.update(images, image_ids, texts, text_ids, text_image_ids)
    metric.update(images[:0], image_ids[:0], texts[:1], text_ids[:1], other)
    with pytest.raises(ValueError, match="attached to more than one image id"):
        metric.compute()


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_metric_errors() -> None:
    metric = RetrievalMetrics()
    with pytest.raises(RuntimeError, match="call update"):
        metric.compute()
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric.update(
            torch.ones(2, 4), torch.arange(2), torch.full((2, 4), math.inf), torch.arange(2), torch.arange(2)
        )
    with pytest.raises(ValueError, match="same width"):
        metric.update(torch.ones(2, 4), torch.arange(2), torch.ones(2, 3), torch.arange(2), torch.arange(2))
    with pytest.raises(ValueError, match="text_ids has 1 entries"):
        metric.update(torch.ones(2, 4), torch.arange(2), torch.ones(2, 4), torch.arange(1), torch.arange(2))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.ones(2, 4), torch.arange(2.0), torch.ones(2, 4), torch.arange(2), torch.arange(2))
    # A caption whose image never arrived.
    metric.update(
        torch.eye(2), torch.arange(2), torch.eye(2)[[0, 1, 1]], torch.arange(3), torch.tensor([0, 1, 5])
    )
    with pytest.raises(ValueError, match=r"belong to image ids \[5\]"):
        metric.compute()
    metric.reset()
    metric.update(torch.eye(2), torch.arange(2), torch.eye(2), torch.arange(2), torch.arange(2))
    assert float(metric.compute()["rsum"]) == 600.0
    with pytest.raises(ValueError, match="duplicate_atol"):
        RetrievalMetrics(duplicate_atol=-1.0)
    with pytest.raises(ValueError, match="ties"):
        RetrievalMetrics(ties="best")  # type: ignore[arg-type]


def test_metric_states_are_cat_reduced_lists() -> None:
    from torchmetrics.utilities.data import dim_zero_cat

    metric = RetrievalMetrics()
    for name in ("image_embeds", "image_ids", "text_embeds", "text_ids", "text_image_ids"):
        assert metric._defaults[name] == []
        assert metric._reductions[name] is dim_zero_cat


# ----------------------------------------------------------------------------- DDP

_DDP_IMAGES = 11  # odd: a 2-process DistributedSampler must pad with a repeated image


def _ddp_data() -> dict[str, torch.Tensor]:
    return make_data(99, n_img=_DDP_IMAGES, dim=12, max_captions=4, dtype=torch.float32)


def _eval_batches(data: dict[str, torch.Tensor], image_rows: list[int], batch_size: int) -> list[tuple]:
    """Evaluation batches as the data module builds them: some images, each with all of its captions."""
    batches = []
    for start in range(0, len(image_rows), batch_size):
        rows = torch.tensor(image_rows[start : start + batch_size])
        caps = torch.cat([(data["owner"] == r).nonzero().squeeze(1) for r in rows.tolist()])
        batches.append(_metric_args(data, rows, caps))
    return batches


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    # Forked children must not reuse the parent's OpenMP pool (as in DataLoader workers): one thread.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        data = _ddp_data()
        sampler = DistributedSampler(range(_DDP_IMAGES), num_replicas=world_size, rank=rank, shuffle=False)
        rows = list(sampler)
        metric = RetrievalMetrics(chunk_size=4)
        for batch in _eval_batches(data, rows, batch_size=2):
            metric.update(*batch)
        torch.save({"rows": rows, "metrics": metric.compute()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_with_padded_sampler_matches_single_process(tmp_path: Path) -> None:
    world_size = 2
    # fork, not spawn: a spawned child would spend seconds re-importing torch and torchmetrics.
    mp.start_processes(
        _ddp_worker,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method="fork",
    )
    data = _ddp_data()
    single = RetrievalMetrics()
    for batch in _eval_batches(data, list(range(_DDP_IMAGES)), batch_size=5):
        single.update(*batch)
    expected = single.compute()
    seen = []
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        seen += result["rows"]
        assert result["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(result["metrics"][key], value), (rank, key)
    # The sampler did pad with a duplicate, and every image was seen.
    assert len(seen) > _DDP_IMAGES and set(seen) == set(range(_DDP_IMAGES))


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_all_zero_embeddings_count_as_misses(ties: str) -> None:
    # A zero vector scores 0 against everything: under the optimistic rule it would tie its way to rank 1.
    # Such queries, and queries whose relevant candidates are all zero, get the worst possible rank.
    data = make_data(12, quantised=True)
    images, texts, owner = data["image_embeds"].clone(), data["text_embeds"].clone(), data["owner"]
    counts = torch.bincount(owner)
    several = (counts >= 2).nonzero().squeeze(1).tolist()
    dead_image, captionless, partly = 0, several[0], several[1]
    images[dead_image] = 0
    texts[owner == captionless] = 0  # every caption of one image
    half_dead = (owner == partly).nonzero()[0]
    texts[half_dead] = 0  # one caption of another: it must not serve as that image's best caption
    zeroed = dict(data, image_embeds=images, text_embeds=texts)
    i2t, t2i = retrieval_ranks(*_args(zeroed), chunk_size=5, ties=ties)
    n_img, n_txt = images.shape[0], texts.shape[0]
    for image in (dead_image, captionless):
        assert i2t[image] == n_txt - counts[image] + 1
        assert (t2i[owner == image] == n_img).all()
    assert t2i[half_dead] == n_img
    # The partly dead image is ranked by its live captions; the zero one is a non-relevant candidate (0).
    live = torch.ones(n_txt, dtype=torch.bool)
    live[half_dead] = False
    ref_i2t, _ = reference_ranks(dict(zeroed, text_embeds=texts[live], owner=owner[live]), ties)
    best = float((images[partly] @ texts[live & (owner == partly)].T).max())
    assert i2t[partly] == ref_i2t[partly] + int(best < 0.0 if ties == "optimistic" else best <= 0.0)
    # Every other query is ranked as the brute-force reference ranks it.
    ref_i2t, ref_t2i = reference_ranks(zeroed, ties)
    others = torch.ones(n_img, dtype=torch.bool)
    others[[dead_image, captionless, partly]] = False
    assert torch.equal(i2t[others], ref_i2t[others])
    untouched = ~(texts == 0).all(dim=1) & ~(images[owner] == 0).all(dim=1)
    assert torch.equal(t2i[untouched], ref_t2i[untouched])


def test_metric_warns_about_all_zero_embeddings() -> None:
    metric = RetrievalMetrics(ks=(1,))
    metric.update(torch.zeros(2, 4), torch.arange(2), torch.ones(2, 4), torch.arange(2), torch.arange(2))
    with pytest.warns(
        UserWarning, match="2 of 2 image embeddings and 0 of 2 caption embeddings are all zero"
    ):
        values = metric.compute()
    # Every query misses, whatever the tie rule: a collapsed model does not score R@1 = 100.
    assert float(values["i2t_R@1"]) == 0.0 and float(values["t2i_R@1"]) == 0.0


def test_effective_rank_and_spread_on_known_geometry() -> None:
    from pefttune.metrics import effective_rank, embedding_spread

    # The d unit vectors e_i: mean (1/d, ..., 1/d), spread 1 - 1/d; centred, d - 1 equal singular values.
    eye = torch.eye(6)
    assert embedding_spread(eye) == pytest.approx(1 - 1 / 6)
    assert effective_rank(eye) == pytest.approx(5.0, rel=1e-6)
    assert embedding_spread(torch.ones(5, 3) / 3**0.5) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(torch.ones(5, 3)) == 0.0
    # Large sets are estimated on an evenly spaced subset; isotropic data keeps a high rank either way.
    g = torch.Generator().manual_seed(0)
    many = F.normalize(torch.randn(20000, 8, generator=g), dim=1)
    assert effective_rank(many, max_items=512) == pytest.approx(
        effective_rank(many, max_items=20000), rel=0.05
    )
    assert effective_rank(many) > 7
