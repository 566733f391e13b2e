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
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0), key
    if quantised:
        # The planted duplicates must create relevant/non-relevant ties, or the tie rules are untested.
        other_i2t, other_t2i = reference_ranks(data, "pessimistic" if ties == "optimistic" else "optimistic")
        assert not (torch.equal(ref_i2t, other_i2t) and torch.equal(ref_t2i, other_t2i))


def test_tie_rules_on_hand_computed_example() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    image_ids = torch.tensor([7, 3])
    text_image_ids = torch.tensor([7, 3, 3])
    # Image 7: its caption scores 1, caption 1 (of image 3) also scores 1 -> a tie.
    # Caption 1: images 7 and 3 both score 1 -> a tie with its own image 3.
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids)
    assert i2t.tolist() == [1, 1]
    assert t2i.tolist() == [1, 1, 1]
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids, ties="pessimistic")
    assert i2t.tolist() == [2, 1]
    assert t2i.tolist() == [1, 2, 1]


def test_collapsed_embeddings() -> None:
    n_caps = torch.tensor([1, 3, 2, 5])
    text_image_ids = torch.repeat_interleave(torch.arange(4), n_caps)
    images, texts = torch.ones(4, 8), torch.ones(int(n_caps.sum()), 8)
    i2t, t2i = retrieval_ranks(images, torch.arange(4), texts, text_image_ids)
    assert i2t.eq(1).all() and t2i.eq(1).all()
    i2t, t2i = retrieval_ranks(images, torch.arange(4), texts, text_image_ids, ties="pessimistic")
    assert i2t.tolist() == (1 + n_caps.sum() - n_caps).tolist()
    assert t2i.eq(4).all()


def test_k_larger_than_candidate_count() -> None:
    data = make_data(5, n_img=3, max_captions=2)
    ks = (1, 2, 4, 50)
    got = retrieval_metrics(*_args(data), ks=ks)
    expected = reference_metrics(*reference_ranks(data), ks)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
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
    assert got.keys() == expected.keys()
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
    assert metric.compute() == reference.compute()


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
