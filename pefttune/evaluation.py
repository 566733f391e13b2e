"""Zero-shot classification inside the Lightning loop: class embeddings from prompts, top-1 per class group.

:class:`~pefttune.module.DualEncoderModule` evaluates classification batches (``"labels" in batch``) with
:class:`ZeroShotEvaluation`, for every strategy alike:

1. When an evaluation epoch starts, the data module names the class groups of the stage
   (``datamodule.evaluation_groups(stage)``: one per dataloader; ``base`` and ``new`` for base-to-new).
2. When a group's first batch arrives, the strategy is told every prompt of that group
   (``strategy.on_evaluation_start(module, prompts)``; APEX computes its ensemble weights there, so base
   and new classes get their own image-side weight, as in APEX's separate base and new evaluations), and
   the prompts are encoded with ``strategy.evaluation_text_embeddings``. A class embedding is the mean over
   templates of the L2-normalised prompt embeddings, normalised again
   (:func:`~pefttune.metrics.zeroshot.class_embeddings`).
3. Each batch's images are encoded with ``strategy.evaluation_image_embeddings``; the predicted class is
   the one of highest cosine similarity (:func:`~pefttune.metrics.zeroshot.zero_shot_logits`, ties to the
   lowest class index), and :class:`ZeroShotMetric` records whether it is the label.
4. At the end of the epoch: top-1 accuracy (percent) per group, and the harmonic mean of base and new
   (:func:`~pefttune.metrics.zeroshot.harmonic_mean`) when both were evaluated.

Exactness under DDP: :class:`~pefttune.metrics.zeroshot.ZeroShotAccuracy` keeps sums and so counts the
samples a ``DistributedSampler`` repeats to pad the last batch twice. :class:`ZeroShotMetric` keeps one
``(group, image id, correct)`` row per sample instead and drops repeated ``(group, image id)`` pairs before
averaging, so the accuracy equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from pefttune.data.contracts import ClassificationData
from pefttune.metrics.zeroshot import class_embeddings, harmonic_mean, zero_shot_logits

if TYPE_CHECKING:
    from pefttune.data.classification import ClassGroup
    from pefttune.module import DualEncoderModule
    from pefttune.strategies.base import AdaptationStrategy

__all__ = [
    "ZeroShotEvaluation",
    "ZeroShotMetric",
    "encode_class_prompts",
    "metric_name",
    "text_prompt_prefix",
]

_PROMPT_CHUNK = 256


def text_prompt_prefix(strategy: AdaptationStrategy) -> str:
    """The leading template words a strategy's learned text context plays (``""`` for most strategies).

    A strategy that inserts learnable context after the start token in place of words of the prompt
    (APEX: ``"a photo"``) exposes them as ``text_prompt_prefix``; class-prompt templates are then used
    without them.
    """
    return str(strategy.text_prompt_prefix or "")


def metric_name(stage: str, group: str) -> str:
    """``val/acc`` for the group ``all``, ``val/acc_base``, ``test/acc_new``, ... for the others."""
    return f"{stage}/acc" if group == "all" else f"{stage}/acc_{group}"


def encode_class_prompts(
    module: DualEncoderModule, prompts: Sequence[Sequence[str]], chunk_size: int = _PROMPT_CHUNK
) -> Tensor:
    """Class embeddings [C, D] from ``prompts[c][t]``, as the module's strategy encodes texts at evaluation.

    Args:
        module: The model (its text tower tokenizes, its strategy encodes).
        prompts: The prompts of each class; every class has the same number of templates.
        chunk_size: Prompts encoded at a time.

    Returns:
        Per class, the normalised mean over templates of the normalised prompt embeddings (float32).
    """
    counts = {len(row) for row in prompts}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"every class needs the same, non-zero number of prompts; got counts {sorted(counts)}"
        )
    flat = [prompt for row in prompts for prompt in row]
    rows = []
    for start in range(0, len(flat), chunk_size):
        tokens = module.text_tower.tokenize(flat[start : start + chunk_size])
        tokens = {key: value.to(module.device) for key, value in tokens.items()}
        embeds = module.strategy.evaluation_text_embeddings(
            module, tokens["input_ids"], tokens["attention_mask"]
        )
        rows.append(embeds.float())
    per_template = torch.cat(rows).reshape(len(prompts), counts.pop(), -1)
    return class_embeddings(per_template)


class ZeroShotMetric(Metric):
    """Top-1 accuracy (percent) per class group, de-duplicated by image id (exact under DDP).

    States are ``cat`` lists of group indices, image ids and 0/1 correctness, one row per evaluated sample.
    :meth:`compute` keeps the first row of every ``(group, image id)`` pair, then averages per group.
    Every process must call :meth:`update` at least once before :meth:`compute` under DDP (a
    ``DistributedSampler`` guarantees it).

    Args:
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    groups: list[Tensor] | Tensor
    image_ids: list[Tensor] | Tensor
    correct: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor, image_ids: Tensor, group: int = 0) -> None:
        """Record, for each image of a batch, whether its highest-scoring class is its label.

        Args:
            logits: Class scores [N, C] (e.g. from :func:`~pefttune.metrics.zeroshot.zero_shot_logits`).
            labels: True class indices [N] in ``[0, C)``.
            image_ids: Sample ids [N], unique within the group over the whole evaluation set.
            group: Index of the class group the batch belongs to.

        Raises:
            ValueError: On shape mismatches or labels outside ``[0, C)``.
        """
        if logits.ndim != 2 or labels.ndim != 1 or image_ids.ndim != 1:
            raise ValueError("logits must be [N, C], labels and image_ids [N]")
        if not (logits.shape[0] == labels.shape[0] == image_ids.shape[0]):
            raise ValueError(
                f"{logits.shape[0]} logits rows, {labels.shape[0]} labels and {image_ids.shape[0]} image ids"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
            raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
        device = self.device
        # argmax returns the lowest index among tied maxima (the rule of pefttune.metrics.zeroshot).
        hits = (logits.detach().argmax(dim=1) == labels.to(logits.device)).to(device=device, dtype=torch.long)
        self.correct.append(hits)
        self.image_ids.append(image_ids.detach().to(device=device, dtype=torch.long))
        self.groups.append(torch.full_like(hits, int(group)))

    def compute(self) -> dict[int, Tensor]:
        """Accuracy in percent per group index (0-dim float64 tensors), duplicates removed.

        Raises:
            RuntimeError: If no sample was added.
        """
        groups, ids, correct = (
            dim_zero_cat(state).long() for state in (self.groups, self.image_ids, self.correct)
        )
        if groups.numel() == 0:
            raise RuntimeError("ZeroShotMetric.compute() called before any sample was added")
        keys, inverse = torch.unique(torch.stack([groups, ids], dim=1), dim=0, return_inverse=True)
        positions = torch.arange(groups.numel(), device=groups.device)
        first = torch.full((keys.shape[0],), groups.numel(), dtype=torch.long, device=groups.device)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        kept_groups, kept_correct = groups[first], correct[first].double()
        return {
            int(group): 100.0 * kept_correct[kept_groups == group].mean()
            for group in torch.unique(kept_groups).tolist()
        }


class ZeroShotEvaluation:
    """One evaluation epoch over classification batches: the class groups and the active group's classes.

    Args:
        groups: The class groups, one per dataloader (``dataloader_idx`` indexes them).
    """

    def __init__(self, groups: Sequence[ClassGroup]) -> None:
        if not groups:
            raise ValueError("a zero-shot evaluation needs at least one class group")
        self.groups = list(groups)
        self.active: int | None = None
        self.class_embeds: Tensor | None = None

    @classmethod
    def for_datamodule(cls, datamodule: object, stage: str) -> ZeroShotEvaluation | None:
        """The evaluation of a stage, or None when the data module has no class groups.

        Args:
            datamodule: Any data module; only a :class:`~pefttune.data.contracts.ClassificationData` has
                class groups (retrieval data, or none, gives None).
            stage: ``"validate"``, ``"test"`` or ``"predict"``.
        """
        if not isinstance(datamodule, ClassificationData):
            return None
        groups = datamodule.evaluation_groups(stage)
        return cls(groups) if groups else None

    def activate(self, module: DualEncoderModule, index: int) -> Tensor:
        """Prepare the strategy for group ``index`` and encode its classes (once per switch of group)."""
        if not 0 <= index < len(self.groups):
            raise IndexError(f"dataloader {index} has no class group ({len(self.groups)} groups)")
        if self.active != index or self.class_embeds is None:
            group = self.groups[index]
            module.strategy.on_evaluation_start(module, group.flat_prompts)
            self.class_embeds = encode_class_prompts(module, group.prompts)
            self.active = index
        return self.class_embeds

    def scores(
        self, module: DualEncoderModule, batch: dict[str, Tensor], index: int
    ) -> tuple[Tensor, Tensor]:
        """A batch's image embeddings [B, D] and their cosine similarities [B, C] to the group's classes."""
        classes = self.activate(module, index)
        images = module.evaluation_image_embeddings(batch).float()  # videos pooled over their real frames
        return images, zero_shot_logits(images, classes)

    def update(
        self, module: DualEncoderModule, batch: dict[str, Tensor], index: int, metric: ZeroShotMetric
    ) -> None:
        """Score one batch of group ``index`` into ``metric``."""
        _, logits = self.scores(module, batch, index)
        metric.update(logits, batch["labels"], batch["image_ids"], group=index)

    def results(self, stage: str, metric: ZeroShotMetric) -> dict[str, float]:
        """Accuracy per group (``{stage}/acc``, ``{stage}/acc_base``, ...) and ``{stage}/acc_hm``."""
        by_index = metric.compute()
        accuracy = {self.groups[i].name: float(value) for i, value in by_index.items()}
        results = {metric_name(stage, name): value for name, value in accuracy.items()}
        if "base" in accuracy and "new" in accuracy:
            results[f"{stage}/acc_hm"] = harmonic_mean(accuracy["base"], accuracy["new"])
        return results
