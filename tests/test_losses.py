"""Single-process tests of pefttune.losses against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pefttune.losses import (
    ContrastiveLoss,
    InfoNCELoss,
    MultiPositiveInfoNCELoss,
    SigLIPLoss,
    gather_no_grad,
    gather_with_grad,
)


def random_pairs(batch: int = 6, dim: int = 5, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    texts = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    return images, texts


def reference_infonce(images, texts, scale):
    """Loop over anchors with an explicit log-sum-exp, both directions, averaged."""
    batch = images.shape[0]
    sims = [[float(images[i] @ texts[j]) * scale for j in range(batch)] for i in range(batch)]
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(batch):
        row = sims[i]
        column = [sims[j][i] for j in range(batch)]
        image_to_text -= row[i] - math.log(sum(math.exp(v) for v in row))
        text_to_image -= column[i] - math.log(sum(math.exp(v) for v in column))
    return 0.5 * (image_to_text + text_to_image) / batch


def reference_multi_positive(images, texts, scale, image_ids, text_ids, reduction="sum"):
    """Brute-force DueT Eq. 3-4: positives share the image id or the text id."""
    batch = images.shape[0]
    sims = [[float(images[i] @ texts[j]) * scale for j in range(batch)] for i in range(batch)]
    totals = []
    for transpose in (False, True):
        total = 0.0
        for i in range(batch):
            row = [sims[j][i] if transpose else sims[i][j] for j in range(batch)]
            log_norm = math.log(sum(math.exp(v) for v in row))
            positives = [
                k
                for k in range(batch)
                if int(image_ids[k]) == int(image_ids[i]) or int(text_ids[k]) == int(text_ids[i])
            ]
            total -= sum(row[k] - log_norm for k in positives) / len(positives)
        totals.append(total / batch)
    combined = totals[0] + totals[1]
    return combined if reduction == "sum" else combined / 2


def reference_siglip(images, texts, scale, bias):
    batch = images.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            label = 1.0 if i == j else -1.0
            logit = scale * float(images[i] @ texts[j]) + bias
            total -= -math.log1p(math.exp(-label * logit))
    return total / batch


def test_infonce_matches_reference():
    images, texts = random_pairs()
    loss = InfoNCELoss()(images, texts, torch.tensor(7.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(reference_infonce(images, texts, 7.0), rel=1e-10)


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("gather", [True, False])
def test_infonce_options_agree_in_a_single_process(local_loss, gather):
    images, texts = random_pairs(seed=3)
    loss = InfoNCELoss(gather_with_grad=gather, local_loss=local_loss)(images, texts, 5.0)
    assert loss.item() == pytest.approx(reference_infonce(images, texts, 5.0), rel=1e-10)


def test_infonce_perfect_alignment_gives_near_zero_loss():
    embeds = torch.eye(4, 8, dtype=torch.float64)
    aligned = InfoNCELoss()(embeds, embeds.clone(), torch.tensor(100.0))
    assert aligned.item() < 1e-12
    # The same scale with mismatched pairs must give a large loss, so the check above is informative.
    shuffled = InfoNCELoss()(embeds, embeds.roll(1, dims=0), torch.tensor(100.0))
    assert shuffled.item() > 50.0


@pytest.mark.parametrize("reduction, factor", [("sum", 2.0), ("mean", 1.0)])
def test_multi_positive_without_duplicates_is_scaled_infonce(reduction, factor):
    images, texts = random_pairs(seed=1)
    scale = torch.tensor(64.0, dtype=torch.float64)
    infonce = InfoNCELoss()(images, texts, scale)
    loss = MultiPositiveInfoNCELoss(reduction)
    unique = torch.arange(6)
    with_ids = loss(images, texts, scale, image_ids=unique, text_ids=unique + 100)
    without_ids = loss(images, texts, scale)
    torch.testing.assert_close(with_ids, factor * infonce, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(without_ids, factor * infonce, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_multi_positive_with_duplicates_matches_brute_force(reduction):
    images, texts = random_pairs(batch=7, seed=2)
    # Rows 0/3/5 share an image, rows 1/4 share a caption, row 5 also shares a caption with row 6:
    # P_5 = {0, 3, 5, 6} mixes both kinds of positive.
    image_ids = torch.tensor([10, 11, 12, 10, 13, 10, 14])
    text_ids = torch.tensor([20, 21, 22, 23, 21, 25, 25])
    scale = 9.0
    loss = MultiPositiveInfoNCELoss(reduction)(
        images, texts, torch.tensor(scale), image_ids=image_ids, text_ids=text_ids
    )
    expected = reference_multi_positive(images, texts, scale, image_ids, text_ids, reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # Duplicates change the loss: the check above distinguishes the multi-positive from plain InfoNCE.
    plain = MultiPositiveInfoNCELoss(reduction)(images, texts, torch.tensor(scale))
    assert abs(plain.item() - loss.item()) > 1e-3


def test_multi_positive_with_only_image_ids():
    images, texts = random_pairs(batch=5, seed=4)
    image_ids = torch.tensor([1, 2, 1, 3, 2])
    loss = MultiPositiveInfoNCELoss()(images, texts, 4.0, image_ids=image_ids)
    distinct_texts = torch.arange(5) + 100
    expected = reference_multi_positive(images, texts, 4.0, image_ids, distinct_texts)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_multi_positive_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction_over_directions"):
        MultiPositiveInfoNCELoss("max")  # type: ignore[arg-type]


def test_siglip_matches_brute_force():
    images, texts = random_pairs(batch=5, seed=5)
    loss = SigLIPLoss()(images, texts, torch.tensor(10.0), torch.tensor(-10.0))
    assert loss.item() == pytest.approx(reference_siglip(images, texts, 10.0, -10.0), rel=1e-10)
    loss = SigLIPLoss()(images, texts, 3.0, 0.5)
    assert loss.item() == pytest.approx(reference_siglip(images, texts, 3.0, 0.5), rel=1e-10)


def test_class_attributes():
    assert SigLIPLoss.needs_bias is True
    assert SigLIPLoss.init_bias == -10.0
    assert SigLIPLoss.init_scale == 10.0
    for cls in (InfoNCELoss, MultiPositiveInfoNCELoss):
        assert issubclass(cls, ContrastiveLoss)
        assert cls.needs_bias is False
        assert cls.init_bias is None


def _loss_with_args(name):
    if name == "infonce":
        return InfoNCELoss(), False
    if name == "multipos":
        return MultiPositiveInfoNCELoss(), False
    return SigLIPLoss(), True


@pytest.mark.parametrize("name", ["infonce", "multipos", "siglip"])
def test_gradients_flow_to_embeddings_scale_and_bias(name):
    loss_fn, with_bias = _loss_with_args(name)
    gen = torch.Generator().manual_seed(6)
    raw_images = torch.randn(5, 4, generator=gen, requires_grad=True)
    raw_texts = torch.randn(5, 4, generator=gen, requires_grad=True)
    log_scale = torch.tensor(math.log(8.0), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True) if with_bias else None
    ids = torch.tensor([0, 1, 0, 2, 3])
    loss = loss_fn(
        F.normalize(raw_images, dim=-1),
        F.normalize(raw_texts, dim=-1),
        log_scale.exp(),
        bias,
        image_ids=ids,
        text_ids=ids + 10,
    )
    loss.backward()
    leaves = [raw_images, raw_texts, log_scale] + ([bias] if with_bias else [])
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["infonce", "multipos", "siglip"])
def test_gradcheck(name):
    loss_fn, with_bias = _loss_with_args(name)
    images, texts = random_pairs(batch=4, dim=3, seed=7)
    ids = torch.tensor([0, 1, 0, 2])
    inputs = (
        images.requires_grad_(),
        texts.requires_grad_(),
        torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
        torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
    )

    def fn(x, y, scale, bias):
        return loss_fn(x, y, scale, bias if with_bias else None, image_ids=ids, text_ids=ids + 10)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["infonce", "multipos", "siglip"])
def test_autocast_computes_in_float32(name, dtype):
    loss_fn, with_bias = _loss_with_args(name)
    gen = torch.Generator().manual_seed(8)
    image_tower = torch.nn.Linear(6, 4)
    text_tower = torch.nn.Linear(5, 4)
    log_scale = torch.tensor(math.log(50.0), requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True) if with_bias else None
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])
    with torch.autocast("cpu", dtype=dtype):
        images = F.normalize(image_tower(torch.randn(8, 6, generator=gen)), dim=-1)
        texts = F.normalize(text_tower(torch.randn(8, 5, generator=gen)), dim=-1)
        assert image_tower(torch.zeros(1, 6)).dtype == dtype  # autocast is really active
        loss = loss_fn(images, texts, log_scale.exp(), bias, image_ids=ids, text_ids=ids + 10)
    assert loss.dtype == torch.float32
    # Identical to the loss on the same (low-precision) embeddings upcast outside autocast: the
    # logits were not computed in low precision.
    expected = loss_fn(images.float(), texts.float(), log_scale.exp(), bias, image_ids=ids, text_ids=ids + 10)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert image_tower.weight.grad is not None and torch.isfinite(image_tower.weight.grad).all()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


def test_single_process_gather_helpers_are_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    gathered = gather_no_grad(x)
    assert not gathered.requires_grad
    torch.testing.assert_close(gathered, x.detach(), rtol=0.0, atol=0.0)
    ids = torch.tensor([4, 5])
    assert torch.equal(gather_no_grad(ids), ids)


def test_input_validation():
    images, texts = random_pairs(batch=4)
    with pytest.raises(ValueError, match="same shape"):
        InfoNCELoss()(images, texts[:3], 1.0)
    with pytest.raises(ValueError, match="image_ids"):
        MultiPositiveInfoNCELoss()(images, texts, 1.0, image_ids=torch.arange(3))
    with pytest.raises(ValueError, match="needs a logit_bias"):
        SigLIPLoss()(images, texts, 1.0)
    with pytest.raises(ValueError, match="does not use a logit bias"):
        InfoNCELoss()(images, texts, 1.0, torch.tensor(0.0))
