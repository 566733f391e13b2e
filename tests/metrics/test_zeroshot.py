"""Tests of zero-shot classification accuracy and the base-to-new harmonic mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pefttune.metrics import (
    ZeroShotAccuracy,
    class_embeddings,
    harmonic_mean,
    top1_accuracy,
    zero_shot_logits,
)


def test_class_embeddings_average_normalised_templates() -> None:
    # Class 0: two templates of very different length pointing along x and y.
    templates = torch.tensor(
        [
            [[10.0, 0.0, 0.0], [0.0, 0.5, 0.0]],
            [[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]],
        ]
    )
    got = class_embeddings(templates)
    s = 2**-0.5
    # Normalising before averaging makes both templates count equally (without it, class 0 would be ~x).
    assert torch.allclose(got, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(got.norm(dim=1), torch.ones(2))
    # A single template per class ([C, D]) is just normalised.
    assert torch.allclose(class_embeddings(templates[:, 0]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_zero_shot_logits_are_scaled_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    images, classes = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    logits = zero_shot_logits(images * 3, classes, logit_scale=100.0)
    expected = 100.0 * F.cosine_similarity(images[:, None], classes[None], dim=-1)
    assert logits.shape == (6, 4)
    assert torch.allclose(logits, expected, atol=1e-4)
    templates = torch.randn(4, 3, 5, generator=g)
    assert torch.allclose(
        zero_shot_logits(images, templates), zero_shot_logits(images, class_embeddings(templates))
    )


def test_top1_accuracy() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.5, 0.5, 0.0], [0.0, 0.1, 0.2]])
    # Row 2 is a tie between classes 0 and 1: the lowest index wins.
    assert top1_accuracy(logits, torch.tensor([0, 1, 0, 0])) == 75.0
    assert top1_accuracy(logits, torch.tensor([0, 1, 1, 2])) == 75.0
    assert top1_accuracy(logits, torch.tensor([1, 0, 2, 0])) == 0.0


def test_harmonic_mean() -> None:
    # Zero-shot CLIP's base-to-new row in docs/methods.md section 3.5: base 69.34, new 74.22, H 71.70.
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.005)
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(0.0, 80.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean(-1.0, 50.0)


def _classification(seed: int, n: int = 40, n_classes: int = 5, dim: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(n_classes, 3, dim, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    images = class_embeddings(templates)[labels] + 0.8 * torch.randn(n, dim, generator=g)
    return images, templates, labels


def test_metric_with_logits_and_with_embeddings_over_batches() -> None:
    images, templates, labels = _classification(1)
    expected = top1_accuracy(zero_shot_logits(images, templates), labels)
    assert 0.0 < expected < 100.0  # neither trivial nor hopeless, so both branches are exercised
    from_logits, from_embeds = ZeroShotAccuracy(), ZeroShotAccuracy()
    for start in range(0, labels.numel(), 7):
        batch = slice(start, start + 7)
        from_logits.update(zero_shot_logits(images[batch], templates, logit_scale=50.0), labels[batch])
        from_embeds.update(images[batch], labels[batch], class_embeds=templates)
    assert float(from_logits.compute()) == pytest.approx(expected, rel=1e-12)
    assert float(from_embeds.compute()) == pytest.approx(expected, rel=1e-12)


def test_metric_states_sum_across_processes() -> None:
    # merge_state applies the declared dist_reduce_fx, as a DDP sync would.
    images, templates, labels = _classification(2)
    whole, part_a, part_b = ZeroShotAccuracy(), ZeroShotAccuracy(), ZeroShotAccuracy()
    whole.update(images, labels, class_embeds=templates)
    part_a.update(images[:13], labels[:13], class_embeds=templates)
    part_b.update(images[13:], labels[13:], class_embeds=templates)
    part_a.merge_state(part_b)
    assert int(part_a.total) == labels.numel()
    assert torch.equal(part_a.compute(), whole.compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
def test_metric_errors() -> None:
    metric = ZeroShotAccuracy()
    with pytest.raises(RuntimeError, match="before any sample"):
        metric.compute()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metric.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="logits have 2 rows but labels has 3"):
        metric.update(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="same width"):
        metric.update(torch.zeros(2, 4), torch.tensor([0, 1]), class_embeds=torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        zero_shot_logits(torch.full((2, 3), float("nan")), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least one sample"):
        top1_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    # Nothing was counted by the rejected updates.
    assert int(metric.total) == 0
