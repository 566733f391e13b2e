"""The LightningModule: two towers, an adaptation strategy, a contrastive loss and evaluation metrics.

Evaluation follows the data: retrieval batches (captions) are ranked by :class:`RetrievalMetrics`;
classification batches (``"labels" in batch``, from
:class:`~pefttune.data.classification.ClassificationDataModule`) are scored by zero-shot classification
(:mod:`pefttune.evaluation`), one dataloader per class group.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from pefttune.checkpointing import (
    CHECKPOINT_KEY,
    check_checkpoint_fits,
    checkpoint_record,
    record_hyperparameters,
)
from pefttune.data.cache import SharedIdSet, SkipsCachedImages
from pefttune.data.contracts import ClassificationData, RetrievalData
from pefttune.data.preprocessing import Preprocessing
from pefttune.evaluation import ZeroShotEvaluation, ZeroShotMetric, text_prompt_prefix
from pefttune.gradcache import (
    average_gradients,
    broadcast_from_first_rank,
    cached_embeddings,
    running_statistics,
    split_batch,
)
from pefttune.layers.frozen_batchnorm import refreeze_batchnorm_statistics
from pefttune.losses import ContrastiveLoss
from pefttune.metrics import DEFAULT_TIES, RetrievalMetrics
from pefttune.metrics.functional import Ties, _check_ties
from pefttune.optim import Constant, WarmupCosine, fused_variant
from pefttune.strategies.base import PARAMETER_GROUPS, AdaptationStrategy, TextKind, TrainingTexts
from pefttune.strategies.full import FullFineTune
from pefttune.towers.base import ImageTower, TextTower
from pefttune.towers.temporal import MeanPooling, TemporalAggregator

log = logging.getLogger(__name__)


# The evaluation caption protocols (data.init_args.eval_captions), named in results (docs/video.md).
CAPTION_PROTOCOLS = {
    "all": "every caption of each item is a query",
    "one": "one caption per item, MSR-VTT 1k-A style",
}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class _ForgetCachedFeatures:
    """``load_state_dict`` post-hook that empties the locked image features cache (picklable).

    It also empties the id sets through which the training loader skips the cached images.
    """

    def __init__(self, cache: dict[Any, torch.Tensor], skipped: list[SharedIdSet] | None = None) -> None:
        self.cache = cache
        self.skipped = skipped if skipped is not None else []

    def __call__(self, _module: nn.Module, _incompatible_keys: Any) -> None:
        self.cache.clear()
        for ids in self.skipped:
            ids.clear()


def training_texts(datamodule: object) -> TrainingTexts:
    """Every text the data module trains on, for a strategy that asks for them (APEX's text bank).

    The data module's ``training_texts()`` (:class:`~pefttune.data.contracts.RetrievalData`): class prompts
    when it serves zero-shot classification (:class:`~pefttune.data.contracts.ClassificationData`), else
    captions. Empty without such a data module or when the training split streams from shards (logged).
    """
    if not isinstance(datamodule, RetrievalData):
        return TrainingTexts()
    kind: TextKind = "class_prompts" if isinstance(datamodule, ClassificationData) else "captions"
    try:
        return TrainingTexts(tuple(datamodule.training_texts()), kind)
    except RuntimeError as error:
        log.warning("cannot list the training texts (%s)", error)
    return TrainingTexts(kind=kind)


class DualEncoderModule(LightningModule):
    """An image-text dual encoder adapted by a strategy and trained contrastively.

    ``__init__`` calls the ``configure_*`` hooks in order (towers, strategy, loss, temperature, metrics);
    subclasses override a hook rather than ``__init__``. A model is rebuilt from its YAML config (saved by
    the CLI next to the logs), then given a checkpoint's weights.

    Args:
        image_tower: the image encoder (any :class:`~pefttune.towers.ImageTower`).
        text_tower: the text encoder (any :class:`~pefttune.towers.TextTower`).
        strategy: the adaptation method; full fine-tuning when omitted.
        loss: the contrastive loss; the strategy's default when omitted.
        optimizer: an optimizer factory called with the strategy's parameter groups (AdamW when omitted).
        lr_schedule: a per-step schedule over the run (``WarmupCosine`` by default).
        retrieval_top_k: the K of R@K.
        eval_chunk_size: rows of the similarity matrix ranked at a time during evaluation.
        nonfinite_loss: ``raise`` stops with an error naming the step and the last checkpoint; ``skip``
            skips the step (on every rank together) and counts it.
        cache_locked_image_features: reuse a locked image tower's features across epochs when the training
            transform is deterministic (identical results, far fewer forward passes); videos per frame.
        tie_rule: how retrieval ranks candidates that score exactly alike (``docs/protocol.md``): ``expected``
            (the mean over random orders of the tied candidates; default), ``pessimistic`` or ``optimistic``.
        grad_cache_chunk_size: train with gradient caching (GradCache, :mod:`pefttune.gradcache`): encode
            the batch in chunks of this many rows without a graph, compute the loss over the whole batch,
            then re-run each chunk with its embeddings' gradient. Same gradients as the full batch (exact
            without BatchNorm in training mode) at the activation memory of one chunk, for a second
            forward pass of the trainable towers. ``None`` (default) encodes the batch at once.
        compile_towers: compile both towers with ``torch.compile`` when the model is set up for a run
            (``True``, or the keyword arguments of ``torch.compile``, e.g. ``{"mode": "max-autotune"}``).
            In-place (``nn.Module.compile``), so parameter names and checkpoints do not change.
        channels_last: keep the image tower's convolution weights and its input images in the
            channels-last memory layout (faster convolutions on GPUs with tensor cores; CNN towers).
        fused_optimizer: build the optimizer with ``fused=True`` (one kernel per step for all parameters)
            when its class takes that argument (Adam, AdamW, SGD, ...). ``None`` (default): fused wherever
            torch has the kernels for the parameters' device (GPUs, and CPUs since torch 2.4: AdamW's update
            of LiT's 23M parameters takes 16.5 instead of 93 ms on one core), else unfused without a
            warning. ``False``: never fused.
        temporal: how video frames become one embedding (:mod:`pefttune.towers.temporal`); mean pooling
            (CLIP4Clip ``meanP``) when omitted. Used only by video batches (5-D ``pixel_values``).
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        strategy: AdaptationStrategy | None = None,
        loss: ContrastiveLoss | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: WarmupCosine | Constant | None = None,
        retrieval_top_k: Sequence[int] = (1, 5, 10),
        eval_chunk_size: int = 1024,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        cache_locked_image_features: bool = True,
        grad_cache_chunk_size: int | None = None,
        compile_towers: bool | dict[str, Any] = False,
        channels_last: bool = False,
        fused_optimizer: bool | None = None,
        tie_rule: Ties = DEFAULT_TIES,
        temporal: TemporalAggregator | None = None,
    ) -> None:
        super().__init__()
        _check_ties(tie_rule)
        self.tie_rule: Ties = tie_rule
        # Built by the CLI: the whole model config (load_from_checkpoint works without the YAML); in Python:
        # the plain arguments only (towers, strategy, loss and factories are objects).
        record_hyperparameters(
            self, ["image_tower", "text_tower", "strategy", "loss", "optimizer", "lr_schedule"]
        )
        if grad_cache_chunk_size is not None and grad_cache_chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be >= 1 or None, got {grad_cache_chunk_size}")
        self.grad_cache_chunk_size = grad_cache_chunk_size
        # Open while a GradCache step runs outside DDP's reducer: (its no_sync context, sync at the end?).
        self._grad_cache_sync: tuple[contextlib.ExitStack, bool] | None = None
        self.compile_towers = compile_towers
        self.channels_last = channels_last
        self.fused_optimizer = fused_optimizer
        self._towers_compiled = False
        # None, not AdamW, as the default: jsonargparse would otherwise carry AdamW's defaults (eps,
        # weight_decay) over into another optimizer class chosen in a config.
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.AdamW
        self.lr_schedule = lr_schedule if lr_schedule is not None else WarmupCosine()
        self.nonfinite_loss = nonfinite_loss
        self.cache_locked_image_features = cache_locked_image_features
        self.skipped_steps = 0
        # Keys: image id (images, normalised embeddings) or (video id, frame index) (videos, tower outputs).
        self._image_feature_cache: dict[Any, torch.Tensor] = {}
        # Shared with the training dataset's workers: ids whose images need not be loaded (features cached).
        self._skipped_image_ids: list[SharedIdSet] = []
        self.configure_towers(image_tower, text_tower)
        # New image-tower weights make cached features stale (also when a parent module loads them).
        self._forget_features = _ForgetCachedFeatures(self._image_feature_cache, self._skipped_image_ids)
        self.image_tower.register_load_state_dict_post_hook(self._forget_features)
        self.configure_strategy(strategy or FullFineTune())
        self.configure_temporal(temporal)
        self.configure_losses(loss)
        self.configure_temperature()
        self.configure_metrics(tuple(retrieval_top_k), eval_chunk_size)
        if channels_last:
            # Module.to(memory_format=...) converts the 4-d (convolution) weights; moving the model to a
            # device later preserves the layout.
            self.image_tower.to(memory_format=torch.channels_last)

    # -- configure hooks ---------------------------------------------------------------------------
    def configure_towers(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Attach the towers and check that their embeddings meet in one space."""
        if not isinstance(image_tower, ImageTower):
            raise TypeError(f"image_tower must be an ImageTower, got {type(image_tower).__name__}")
        if not isinstance(text_tower, TextTower):
            raise TypeError(f"text_tower must be a TextTower, got {type(text_tower).__name__}")
        if image_tower.embed_dim != text_tower.embed_dim:
            raise ValueError(
                f"the towers' embedding widths differ: image {image_tower.embed_dim} "
                f"({type(image_tower).__name__}), text {text_tower.embed_dim} ({type(text_tower).__name__}); "
                "set their embed_dim to the same value"
            )
        self.image_tower = image_tower
        self.text_tower = text_tower

    def configure_strategy(self, strategy: AdaptationStrategy) -> None:
        """Let the strategy adapt the towers (once)."""
        self.strategy = strategy
        strategy.attach(self.image_tower, self.text_tower)

    def configure_temporal(self, temporal: TemporalAggregator | None) -> None:
        """Attach the temporal aggregator of video frames, built for the image tower's embedding width.

        After the strategy, so that a trainable aggregator's random initialisation leaves the seeded
        initialisation of the strategy's modules as it is for images.
        """
        if temporal is None:
            temporal = MeanPooling()
        if not isinstance(temporal, TemporalAggregator):
            raise TypeError(f"temporal must be a TemporalAggregator, got {type(temporal).__name__}")
        temporal.bind(self.image_tower.embed_dim)
        self.temporal = temporal

    def configure_temperature(self) -> None:
        """Create the logit scale (stored as its log, like CLIP) following the strategy's policy."""
        policy = self.strategy.temperature
        pretrained = self.image_tower.pretrained_logit_scale or self.text_tower.pretrained_logit_scale
        # A loss with its own recommended start (SigLIP: 10) wins over a checkpoint's CLIP scale, unless the
        # checkpoint was trained with that loss (SigLIP towers): then its scale is the one to start from.
        loss_scale = None if self._loss_matches_towers() else self.loss.init_scale
        scale = policy.initial_scale(loss_scale if loss_scale is not None else pretrained)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=policy.learnable)

    def configure_losses(self, loss: ContrastiveLoss | None) -> None:
        """The loss and, for SigLIP, a learnable bias.

        Without a configured loss: the towers' preferred loss (the one their checkpoint was trained with,
        SigLIP's sigmoid loss; see :meth:`Tower.preferred_loss`), else the strategy's default. The bias
        starts from the checkpoint's bias when the loss is the one the towers were trained with.
        """
        if loss is None:
            loss = self.image_tower.preferred_loss() or self.text_tower.preferred_loss()
            if loss is not None:
                log.info("training with %s, the loss the towers were trained with", type(loss).__name__)
        self.loss = loss if loss is not None else self.strategy.default_loss()
        self.logit_bias: nn.Parameter | None = None
        if self.loss.needs_bias:
            bias = self._pretrained_logit_bias() if self._loss_matches_towers() else None
            # The bias belongs with the scale (group "temperature"): it trains exactly when the scale does.
            self.logit_bias = nn.Parameter(
                torch.tensor(float(self.loss.init_bias if bias is None else bias)),
                requires_grad=self.strategy.temperature.learnable,
            )

    def _loss_matches_towers(self) -> bool:
        """Whether the loss is the one a tower's checkpoint was trained with (its scale and bias apply)."""
        return any(
            preferred is not None and type(preferred) is type(self.loss)
            for preferred in (self.image_tower.preferred_loss(), self.text_tower.preferred_loss())
        )

    def _pretrained_logit_bias(self) -> float | None:
        image, text = self.image_tower.pretrained_logit_bias, self.text_tower.pretrained_logit_bias
        return image if image is not None else text

    def configure_metrics(self, top_k: tuple[int, ...], chunk_size: int) -> None:
        """Retrieval and zero-shot classification metrics for validation and test."""
        self.val_retrieval = RetrievalMetrics(ks=top_k, chunk_size=chunk_size, ties=self.tie_rule)
        self.test_retrieval = RetrievalMetrics(ks=top_k, chunk_size=chunk_size, ties=self.tie_rule)
        self.val_zero_shot = ZeroShotMetric()
        self.test_zero_shot = ZeroShotMetric()
        self._zero_shot: ZeroShotEvaluation | None = None

    # -- preprocessing -----------------------------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        """The towers' image transforms and tokenizer, for the data module."""
        return Preprocessing(
            train_transform=self.image_tower.image_transform(train=True),
            eval_transform=self.image_tower.image_transform(train=False),
            tokenize=self.text_tower.tokenize,
            train_transform_is_deterministic=self.image_tower.train_transform_is_deterministic,
            content_hashes=self.loss.image_identity == "content",
        )

    def setup(self, stage: str) -> None:
        """Hand the towers' preprocessing to the data module before its dataloaders are built."""
        self.compile_towers_now()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, RetrievalData):
            datamodule.attach_preprocessing(self.preprocessing)
        if isinstance(datamodule, ClassificationData):
            # Class prompts drop the words a learned text context plays (APEX: "a photo").
            datamodule.set_prompt_prefix(text_prompt_prefix(self.strategy))

    def compile_towers_now(self) -> None:
        """Compile the towers if ``compile_towers`` asks for it (once; called by ``setup``).

        Runs in each process of a run (after DDP workers start), so that no compiled function has to be
        pickled; a bare training loop calls it itself.
        """
        if not self.compile_towers or self._towers_compiled:
            return
        options = {} if self.compile_towers is True else dict(self.compile_towers)
        self.image_tower.compile(**options)
        self.text_tower.compile(**options)
        self._towers_compiled = True

    # -- encoding ----------------------------------------------------------------------------------
    def embed_images(
        self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised embeddings [B, D] of images [B, C, H, W] or videos [B, T, C, H, W].

        A video's T frames are folded into the batch for the image tower ([B*T, C, H, W]); the temporal
        aggregator turns the frame embeddings [B, T, D] and ``frame_mask`` [B, T] (True = real frame; all
        real when omitted) into one embedding per video.
        """
        if pixel_values.ndim == 4:
            if frame_mask is not None:
                raise ValueError("frame_mask belongs to videos [B, T, C, H, W], but pixel_values is 4-D")
            return self._image_tower_forward(pixel_values)
        frames = self._frame_embeddings(pixel_values)
        return self.temporal(frames, frame_mask)

    def _frame_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower on every frame of videos [B, T, C, H, W] -> [B, T, D]."""
        if pixel_values.ndim != 5:
            raise ValueError(
                "pixel_values must be images [B, C, H, W] or videos [B, T, C, H, W], "
                f"got shape {tuple(pixel_values.shape)}"
            )
        batch, length = pixel_values.shape[:2]
        frames = self._image_tower_forward(pixel_values.flatten(0, 1))
        return frames.reshape(batch, length, -1)

    def _image_tower_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower on images [N, C, H, W] (in the channels-last layout when asked for)."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.image_tower(pixel_values)

    def encode_images(
        self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised image (or video) embeddings [B, D] (see :meth:`embed_images`)."""
        return F.normalize(self.embed_images(pixel_values, frame_mask), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [T, D]."""
        return F.normalize(self.text_tower(input_ids, attention_mask), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of a batch (training layout or evaluation layout)."""
        return self.encode_images(batch["pixel_values"], batch.get("frame_mask")), self.encode_texts(
            batch["input_ids"], batch["attention_mask"]
        )

    def _training_image_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self._can_cache_image_features():
            return self.encode_images(batch["pixel_values"], batch.get("frame_mask"))
        if batch["pixel_values"].ndim == 5:
            return self._cached_video_embeddings(batch)
        ids = batch["image_ids"].tolist()
        missing = [i for i, image_id in enumerate(ids) if image_id not in self._image_feature_cache]
        if missing:
            index = torch.tensor(missing, device=batch["pixel_values"].device)
            pixels = batch["pixel_values"].index_select(0, index)
            if self._skipped_image_ids and torch.isnan(pixels).any():
                raise RuntimeError(
                    "the training loader skipped an image whose cached features are gone (the image tower's "
                    "weights were reloaded during the epoch?); image ids "
                    f"{[ids[i] for i in missing]}; set cache_locked_image_features=False to avoid skipping"
                )
            fresh = self.encode_images(pixels)
            for row, i in enumerate(missing):
                self._image_feature_cache[ids[i]] = fresh[row].detach()
            for skipped in self._skipped_image_ids:
                skipped.add([ids[i] for i in missing])
        return torch.stack([self._image_feature_cache[image_id] for image_id in ids])

    def _cached_video_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Video embeddings from per-frame features of the locked tower, cached by (video id, frame index).

        Only the tower's output is cached: the temporal aggregator runs on every step (it may train).
        """
        pixel_values = batch["pixel_values"]
        batch_size, length = pixel_values.shape[:2]
        if "frame_indices" not in batch:
            raise KeyError(
                "a video batch needs 'frame_indices' [B, T] (each frame's index in its clip) for the locked "
                "image feature cache; set model.cache_locked_image_features=false for data without them"
            )
        frame_mask = batch.get("frame_mask")
        if frame_mask is None:
            frame_mask = torch.ones(batch_size, length, dtype=torch.bool, device=pixel_values.device)
        ids = batch["image_ids"].tolist()
        indices = batch["frame_indices"].tolist()
        real = frame_mask.tolist()
        keys = [[(ids[b], int(indices[b][t])) for t in range(length)] for b in range(batch_size)]
        missing = [
            (b, t)
            for b in range(batch_size)
            for t in range(length)
            if real[b][t] and keys[b][t] not in self._image_feature_cache
        ]
        if missing:
            rows = torch.tensor([b * length + t for b, t in missing], device=pixel_values.device)
            fresh = self._image_tower_forward(pixel_values.flatten(0, 1).index_select(0, rows))
            for row, (b, t) in enumerate(missing):
                self._image_feature_cache[keys[b][t]] = fresh[row].detach()
        first_real = next((keys[b][t] for b in range(batch_size) for t in range(length) if real[b][t]), None)
        # Padded frames are zeros the aggregator never reads (a video without real frames fails there).
        reference = self._image_feature_cache[first_real] if first_real is not None else pixel_values
        padding = reference.new_zeros(self.image_tower.embed_dim)
        frames = torch.stack(
            [
                torch.stack(
                    [self._image_feature_cache[keys[b][t]] if real[b][t] else padding for t in range(length)]
                )
                for b in range(batch_size)
            ]
        )
        return F.normalize(self.temporal(frames, frame_mask), dim=-1)

    def locked_image_features_state(self) -> dict[str, torch.Tensor]:
        """The locked image tower's cached features, as tensors a checkpoint can hold (empty when none).

        ``keys`` [N, 1] (image ids) or [N, 2] (video id, frame index) and ``features`` [N, D] on the CPU.
        A resumed run needs these exact values: recomputing them gives other bits, because a tower's output
        for one input depends slightly on which other inputs share its batch (:class:`~pefttune.callbacks.
        ExactResume` saves them).
        """
        if not self._image_feature_cache:
            return {}
        keys = list(self._image_feature_cache)
        rows = [key if isinstance(key, tuple) else (key,) for key in keys]
        return {
            "keys": torch.tensor(rows, dtype=torch.long),
            "features": torch.stack([self._image_feature_cache[key] for key in keys]).cpu(),
        }

    def load_locked_image_features_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`locked_image_features_state` returned (replacing the cache's contents)."""
        self._image_feature_cache.clear()
        if not state:
            return
        keys, features = state["keys"], state["features"]
        if keys.ndim != 2 or keys.shape[1] not in (1, 2) or len(keys) != len(features):
            raise ValueError(
                "locked image features state: expected 'keys' [N, 1] or [N, 2] and 'features' [N, D] with "
                f"the same N, got keys {tuple(keys.shape)} and features {tuple(features.shape)}"
            )
        device = self.logit_scale.device
        for row, key in zip(features.to(device), keys.tolist(), strict=True):
            self._image_feature_cache[key[0] if len(key) == 1 else (key[0], key[1])] = row

    def _can_cache_image_features(self) -> bool:
        return (
            self.cache_locked_image_features
            and self.image_tower.locked
            and self.image_tower.train_transform_is_deterministic
        )

    @property
    def logit_scale_value(self) -> torch.Tensor:
        """The logit scale (1 / temperature)."""
        return self.logit_scale.exp()

    # -- training ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Restore frozen BatchNorm statistics, then give the strategy its chance to look at the data."""
        # Image ids are per data set: features cached by an earlier fit may belong to other images.
        self._forget_features(self.image_tower, None)
        self._skipped_image_ids.clear()
        # With trainer.sync_batchnorm, Lightning's DDP/FSDP setup (which runs before this hook) has replaced
        # every BatchNorm with a new SyncBatchNorm, dropping the hooks that keep a frozen backbone on its
        # running statistics: without this they would silently train. Before the strategy's own hook, which
        # may already run the towers (APEX's text bank).
        restored = refreeze_batchnorm_statistics(self)
        if restored:
            log.info("re-froze the running statistics of %d replaced BatchNorm layers", restored)
        wanted = self.strategy.uses_training_texts
        texts = training_texts(self.trainer.datamodule) if wanted else TrainingTexts()
        self.strategy.on_fit_start(self, texts)

    def on_train_start(self) -> None:
        """Let the training loader skip images whose locked-tower features are cached (from epoch 2 on)."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if self._can_cache_image_features() and isinstance(dataset, SkipsCachedImages):
            ids = SharedIdSet(dataset.num_images)
            # Features a resumed run got back from its checkpoint (ExactResume) need no images either.
            ids.add([key for key in self._image_feature_cache if not isinstance(key, tuple)])
            dataset.skip_images = ids
            self._skipped_image_ids.append(ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One contrastive step over the (global) batch."""
        if self.grad_cache_chunk_size is not None:
            image_embeds, text_embeds = self._grad_cache_embeddings(batch, self.grad_cache_chunk_size)
        else:
            image_embeds = self._training_image_embeddings(batch)
            text_embeds = self.encode_texts(batch["input_ids"], batch["attention_mask"])
        loss = self.loss(
            image_embeds,
            text_embeds,
            self.logit_scale_value,
            self.logit_bias,
            image_ids=batch.get("image_ids"),
            text_ids=batch.get("text_ids"),
            image_hashes=batch.get("image_hashes"),
        )
        if not self._loss_is_finite(loss):
            self._end_grad_cache_step(synchronise=False)  # no backward pass follows
            return self._handle_nonfinite_loss(loss)
        batch_size = image_embeds.shape[0]
        # Each rank holds its share of the global loss; their mean is the global loss.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/logit_scale", self.logit_scale_value.detach(), batch_size=batch_size)
        return loss

    # -- gradient caching ----------------------------------------------------------------------------
    def _grad_cache_embeddings(
        self, batch: dict[str, torch.Tensor], chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' embeddings of the batch, computed chunk by chunk without a graph (GradCache).

        Their backward pass re-runs the chunks of the trainable towers (:func:`cached_embeddings`); a
        locked tower is only run once, chunk by chunk (its features may come from the feature cache).
        """
        self._begin_grad_cache_step()
        # Videos keep their frame mask and indices with their rows.
        image_keys = [k for k in ("pixel_values", "image_ids", "frame_mask", "frame_indices") if k in batch]
        image_chunks = split_batch({key: batch[key] for key in image_keys}, chunk_size)
        if self.image_tower.locked:
            images = torch.cat([self._training_image_embeddings(chunk) for chunk in image_chunks])
        else:
            images = cached_embeddings(
                lambda chunk: self.encode_images(chunk["pixel_values"], chunk.get("frame_mask")),
                image_chunks,
                modules=(self.image_tower, self.strategy),
            )
        text_chunks = split_batch({key: batch[key] for key in ("input_ids", "attention_mask")}, chunk_size)
        encode_text = lambda chunk: self.encode_texts(chunk["input_ids"], chunk["attention_mask"])  # noqa: E731
        if self.text_tower.locked:
            texts = torch.cat([encode_text(chunk) for chunk in text_chunks])
        else:
            texts = cached_embeddings(encode_text, text_chunks, modules=(self.text_tower, self.strategy))
        return images, texts

    def _distributed_wrapper(self) -> nn.parallel.DistributedDataParallel | None:
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        wrapper = self.trainer.strategy.model
        if not isinstance(wrapper, nn.parallel.DistributedDataParallel):
            raise RuntimeError(
                "grad_cache_chunk_size needs a single device or DDP, not "
                f"{type(self.trainer.strategy).__name__} (model wrapped in {type(wrapper).__name__}); set "
                "grad_cache_chunk_size=None or use "
                "strategy='ddp'"
            )
        return wrapper

    def _begin_grad_cache_step(self) -> None:
        """Keep this step's several backward passes out of DDP's reducer; gradients are averaged at the end.

        Called inside DDP's forward (the training step): ``no_sync`` read now is Lightning's decision for
        this step (no sync while accumulating), and leaving it on until the backward pass stops DDP from
        expecting the one backward pass per forward its reducer is built for.
        """
        self._end_grad_cache_step(synchronise=False)
        wrapper = self._distributed_wrapper()
        if wrapper is None:
            return
        synchronise = wrapper.require_backward_grad_sync
        stack = contextlib.ExitStack()
        stack.enter_context(wrapper.no_sync())
        self._grad_cache_sync = (stack, synchronise)

    def _end_grad_cache_step(self, synchronise: bool) -> None:
        if self._grad_cache_sync is None:
            return
        stack, step_synchronises = self._grad_cache_sync
        self._grad_cache_sync = None
        stack.close()
        if not (synchronise and step_synchronises):
            return
        # What DDP's reducer would have done: average the gradients, then align the running statistics
        # (DDP broadcasts rank 0's buffers before each forward; only BatchNorm's change in training).
        average_gradients(p for p in self.parameters() if p.requires_grad)
        if getattr(self.trainer.strategy.model, "broadcast_buffers", True):
            broadcast_from_first_rank(running_statistics(self))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Back-propagate; a GradCache step under DDP then averages the gradients over the ranks."""
        super().backward(loss, *args, **kwargs)
        self._end_grad_cache_step(synchronise=True)

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must take the same decision, or DDP's gradient all-reduce would hang.
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite.item() > 0)

    def _handle_nonfinite_loss(self, loss: torch.Tensor) -> None:
        step = self.global_step
        if self.nonfinite_loss == "skip":
            self.skipped_steps += 1
            log.warning("non-finite training loss (%s) at step %d: step skipped", loss.item(), step)
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None
        callback = getattr(self.trainer, "checkpoint_callback", None)
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        raise NonFiniteLossError(
            f"training loss is {loss.item()} at global step {step} (epoch {self.current_epoch}); "
            f"last good checkpoint: {last or 'none saved yet'}. Lower the learning rate, check the data, "
            "or set model.nonfinite_loss=skip to skip such steps"
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Clamp a learnable logit scale (CLIP clamps at 100 after every step)."""
        max_scale = self.strategy.temperature.max_scale
        if self.logit_scale.requires_grad and max_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(max_scale))

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the strategy's parameter groups, fused as ``fused_optimizer`` says.

        What :meth:`configure_optimizers` trains with; benchmarks that drive the model without a ``Trainer``
        build theirs here too, so that both sides run the same update.
        """
        groups = self.strategy.parameter_groups(self)
        groups = [{k: v for k, v in group.items() if k != "param_names"} for group in groups]
        optimizer = self.optimizer_factory(groups)
        if self.fused_optimizer is not False:
            optimizer = fused_variant(optimizer, quiet=self.fused_optimizer is None)
        return optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over the strategy's parameter groups, and a per-step schedule."""
        optimizer = self.build_optimizer()
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_schedule.build(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation --------------------------------------------------------------------------------
    def evaluation_embeddings(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of an evaluation batch, as the strategy evaluates them."""
        images = self.evaluation_image_embeddings(batch)
        texts = self.strategy.evaluation_text_embeddings(self, batch["input_ids"], batch["attention_mask"])
        return images, texts

    def evaluation_image_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised embeddings of a batch's images, or videos (with their ``frame_mask``), as evaluated."""
        if "frame_mask" in batch:  # videos; image batches keep the two-argument call of custom strategies
            return self.strategy.evaluation_image_embeddings(self, batch["pixel_values"], batch["frame_mask"])
        return self.strategy.evaluation_image_embeddings(self, batch["pixel_values"])

    def _evaluation_texts(self, stage: str) -> list[str]:
        datamodule = self.trainer.datamodule
        return list(datamodule.evaluation_texts(stage)) if isinstance(datamodule, RetrievalData) else []

    def _start_evaluation(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self._zero_shot = ZeroShotEvaluation.for_datamodule(datamodule, stage)
        if self._zero_shot is None:
            self.strategy.on_evaluation_start(self, self._evaluation_texts(stage))
        # Classification: the strategy is told each class group's prompts when the group's first batch comes.

    def on_validation_epoch_start(self) -> None:
        """Let the strategy prepare for the texts it will encode (or set up the class groups)."""
        self._start_evaluation("validate")

    def on_test_epoch_start(self) -> None:
        """Let the strategy prepare for the texts it will encode (or set up the class groups)."""
        self._start_evaluation("test")

    def on_predict_epoch_start(self) -> None:
        """Let the strategy prepare for the texts it will encode (or set up the class groups)."""
        self._start_evaluation("predict")

    def _zero_shot_evaluation(self) -> ZeroShotEvaluation:
        if self._zero_shot is None:
            raise RuntimeError(
                "a classification batch (with 'labels') arrived but no class prompts are known: evaluate "
                "with a data module that provides evaluation_groups(stage), such as ClassificationDataModule"
            )
        return self._zero_shot

    def _evaluation_update(
        self,
        batch: dict[str, torch.Tensor],
        dataloader_idx: int,
        retrieval: RetrievalMetrics,
        zero_shot: ZeroShotMetric,
    ) -> None:
        if "labels" in batch:
            self._zero_shot_evaluation().update(self, batch, dataloader_idx, zero_shot)
            return
        retrieval.update_from_batch(batch, *self.evaluation_embeddings(batch))

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Collect embeddings for retrieval, or score a classification batch."""
        self._evaluation_update(batch, dataloader_idx, self.val_retrieval, self.val_zero_shot)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Collect embeddings for retrieval, or score a classification batch."""
        self._evaluation_update(batch, dataloader_idx, self.test_retrieval, self.test_zero_shot)

    def on_validation_epoch_end(self) -> None:
        """Log retrieval metrics, or zero-shot accuracy per class group."""
        self._log_evaluation("val", self.val_retrieval, self.val_zero_shot)

    def on_test_epoch_end(self) -> None:
        """Log retrieval metrics, or zero-shot accuracy per class group."""
        self._log_evaluation("test", self.test_retrieval, self.test_zero_shot)

    def _log_evaluation(self, stage: str, retrieval: RetrievalMetrics, zero_shot: ZeroShotMetric) -> None:
        classified = zero_shot.update_called
        if classified:
            results = self._zero_shot_evaluation().results(stage, zero_shot)
            zero_shot.reset()
            # Every rank holds the same synchronised numbers; the names carry the group, not the loader.
            self.log_dict(results, sync_dist=False, add_dataloader_idx=False)
        if retrieval.update_called or not classified:
            self._log_retrieval(stage, retrieval)

    @property
    def caption_protocol(self) -> str | None:
        """The evaluation caption protocol of the attached data module (``"all"`` or ``"one"``), or None.

        ``"all"``: every caption of each evaluated item is a text query; ``"one"``: one caption per item
        (MSR-VTT 1k-A). Metric keys are the same under both, so results name it elsewhere: the run's saved
        config, the benchmark results JSON (``protocol``) and a log line with every retrieval result.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.eval_captions if isinstance(datamodule, RetrievalData) else None

    def _log_retrieval(self, stage: str, metric: RetrievalMetrics) -> None:
        results = metric.compute()
        metric.reset()
        self.log_dict({f"{stage}/{k}": float(v) for k, v in results.items()}, sync_dist=False)
        protocol = self.caption_protocol
        if protocol is not None and "t2i_R@1" in results:
            meaning = CAPTION_PROTOCOLS.get(protocol, protocol)
            rank_zero_info(
                f"{stage} retrieval under the {protocol!r} caption protocol ({meaning}): "
                f"text-to-item R@1 {float(results['t2i_R@1']):.2f}, "
                f"item-to-text R@1 {float(results['i2t_R@1']):.2f}"
            )

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Embeddings of an evaluation batch with their ids; class scores and labels for classification."""
        if "labels" in batch:
            images, logits = self._zero_shot_evaluation().scores(self, batch, dataloader_idx)
            return {
                "image_embeds": images.float().cpu(),
                "image_ids": batch["image_ids"].cpu(),
                "labels": batch["labels"].cpu(),
                "logits": logits.cpu(),
            }
        image_embeds, text_embeds = self.evaluation_embeddings(batch)
        return {
            "image_embeds": image_embeds.float().cpu(),
            "image_ids": batch["image_ids"].cpu(),
            "text_embeds": text_embeds.float().cpu(),
            "caption_ids": batch["caption_ids"].cpu(),
            "caption_image_ids": batch["caption_image_ids"].cpu(),
        }

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the strategy and its arguments, so a checkpoint that does not fit says who saved it."""
        checkpoint[CHECKPOINT_KEY] = checkpoint_record(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in a few lines, a checkpoint of another strategy or backbone (before the weights load)."""
        check_checkpoint_fits(self, checkpoint, getattr(self._trainer, "ckpt_path", None))

    # -- reporting ---------------------------------------------------------------------------------
    def parameter_report(self) -> dict[str, Any]:
        """Total and trainable parameters, per group and per tower."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        by_tower = {
            "image": sum(p.numel() for p in self.image_tower.parameters() if p.requires_grad),
            "text": sum(p.numel() for p in self.text_tower.parameters() if p.requires_grad),
            "other": sum(
                p.numel()
                for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith(("image_tower.", "text_tower."))
            ),
        }
        return {
            "strategy": type(self.strategy).__name__,
            "total_params": total,
            "trainable_params": trainable,
            "trainable_fraction": trainable / max(total, 1),
            "trainable_by_group": self.strategy.trainable_by_group(self),
            "trainable_by_tower": by_tower,
            "total_by_tower": {
                "image": sum(p.numel() for p in self.image_tower.parameters()),
                "text": sum(p.numel() for p in self.text_tower.parameters()),
            },
            "groups": list(PARAMETER_GROUPS),
        }
