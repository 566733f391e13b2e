"""Zero-shot classification with a dual encoder: class embeddings from prompt templates, accuracy.

A class is represented by the text embeddings of its prompts (``"a photo of a {}."``, ...). As in CLIP
prompt ensembling, each template embedding is L2-normalised, the normalised embeddings are averaged
over templates, and the mean is normalised again (so every template counts equally, however long its
raw embedding). An image is assigned the class with the highest cosine similarity.

Accuracies are percentages (0-100), as in the CoOp / MaPLe / APEX base-to-new tables; the base-to-new
summary is the harmonic mean of base and new accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ZeroShotAccuracy", "class_embeddings", "harmonic_mean", "top1_accuracy", "zero_shot_logits"]


def _check_float(name: str, x: Tensor, ndims: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in ndims:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        wanted = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be a {wanted} floating-point tensor, got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def class_embeddings(template_embeds: Tensor) -> Tensor:
    """Class embeddings from per-template text embeddings.

    Args:
        template_embeds: [C, T, D] (T templates per class) or [C, D] (one template).

    Returns:
        [C, D]: per class, the mean over templates of the L2-normalised template embeddings,
        L2-normalised again.

    Raises:
        ValueError: If the input is not a 2-D/3-D finite floating-point tensor.
    """
    _check_float("template_embeds", template_embeds, (2, 3))
    if template_embeds.ndim == 2:
        return F.normalize(template_embeds, dim=-1)
    return F.normalize(F.normalize(template_embeds, dim=-1).mean(dim=1), dim=-1)


def zero_shot_logits(image_embeds: Tensor, class_embeds: Tensor, logit_scale: float = 1.0) -> Tensor:
    """Cosine similarity between images and classes, times ``logit_scale``.

    Args:
        image_embeds: [N, D]; normalised here.
        class_embeds: [C, D] class embeddings, or [C, T, D] template embeddings (reduced with
            :func:`class_embeddings`); normalised here.
        logit_scale: Multiplier of the cosine similarities (e.g. the model's learned temperature);
            it does not change the predicted class.

    Returns:
        Logits [N, C].

    Raises:
        ValueError: On wrong ranks, non-finite values or mismatched widths.
    """
    _check_float("image_embeds", image_embeds, (2,))
    classes = class_embeddings(class_embeds)
    if image_embeds.shape[1] != classes.shape[1]:
        raise ValueError(
            f"image_embeds and class_embeds must have the same width, got {image_embeds.shape[1]} and "
            f"{classes.shape[1]}"
        )
    images = F.normalize(image_embeds, dim=-1)
    return logit_scale * images @ classes.to(images.dtype).T


def _check_labels(logits: Tensor, labels: Tensor) -> None:
    _check_float("logits", logits, (2,))
    if (
        not isinstance(labels, Tensor)
        or labels.ndim != 1
        or labels.is_floating_point()
        or labels.dtype == torch.bool
    ):
        raise ValueError("labels must be a 1-D integer tensor of class indices")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but labels has {labels.shape[0]} entries")
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got values in [{low}, {high}]")


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    # argmax picks the lowest class index among tied maxima.
    return (logits.argmax(dim=1) == labels.to(logits.device)).sum()


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent.

    Args:
        logits: Scores [N, C] (e.g. from :func:`zero_shot_logits`).
        labels: True class indices [N].

    Returns:
        100 x fraction of rows whose highest score is the true class (ties: lowest index wins).

    Raises:
        ValueError: On shape mismatches, an empty batch, or labels outside ``[0, C)``.
    """
    _check_labels(logits, labels)
    if labels.numel() == 0:
        raise ValueError("top1_accuracy needs at least one sample")
    return 100.0 * int(_correct(logits, labels)) / labels.numel()


def harmonic_mean(base: float, new: float) -> float:
    """Harmonic mean of base-class and new-class accuracy, ``2 * base * new / (base + new)``.

    Tables averaged over several datasets usually report the mean of the per-dataset harmonic means,
    which is not the harmonic mean of the averaged accuracies: apply this per dataset, then average.

    Args:
        base: Accuracy on the base (seen) classes.
        new: Accuracy on the new (unseen) classes, in the same unit.

    Returns:
        The harmonic mean, in the unit of the inputs; 0 when both are 0.

    Raises:
        ValueError: If an input is negative.
    """
    base, new = float(base), float(new)
    if base < 0 or new < 0:
        raise ValueError(f"accuracies must be non-negative, got base={base}, new={new}")
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)


class ZeroShotAccuracy(Metric):
    """Top-1 accuracy (percent) accumulated over batches and processes.

    :meth:`update` takes either logits [N, C], or image embeddings [N, D] together with
    ``class_embeds`` ([C, D] or [C, T, D], see :func:`class_embeddings`). The states ``correct`` and
    ``total`` are sums, so synchronisation is cheap; unlike :class:`RetrievalMetrics` this metric has
    no sample ids and cannot remove the samples a ``DistributedSampler`` repeats to pad the last
    batch, which are therefore counted twice (at most ``world_size - 1`` extra samples).

    Args:
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor, class_embeds: Tensor | None = None) -> None:
        """Count correct predictions of a batch.

        Args:
            preds: Logits [N, C], or image embeddings [N, D] when ``class_embeds`` is given.
            labels: True class indices [N].
            class_embeds: Class ([C, D]) or template ([C, T, D]) embeddings; when given, ``preds``
                are image embeddings and are scored with :func:`zero_shot_logits`.

        Raises:
            ValueError: On shape mismatches or labels outside ``[0, C)``.
        """
        logits = (
            preds.detach()
            if class_embeds is None
            else zero_shot_logits(preds.detach(), class_embeds.detach())
        )
        _check_labels(logits, labels)
        self.correct += _correct(logits, labels).to(self.correct.device)
        self.total += labels.numel()

    def compute(self) -> Tensor:
        """Accuracy in percent over everything seen since the last reset.

        Returns:
            A 0-dim float64 tensor.

        Raises:
            RuntimeError: If no sample was added.
        """
        if int(self.total) == 0:
            raise RuntimeError("ZeroShotAccuracy.compute() called before any sample was added")
        return 100.0 * self.correct.double() / self.total.double()
