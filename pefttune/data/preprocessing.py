"""The contract between a model's towers and the data pipeline.

Towers own their preprocessing (the image transform and the tokenizer). The data module does not know
which towers it feeds: the model hands it a :class:`Preprocessing` at set-up, and the data module's
collate functions use it.

Batches (all tensors; ids are ``torch.long``):

Training batch, one image-caption pair per row:
    ``pixel_values`` [B, 3, H, W], ``input_ids`` [B, L], ``attention_mask`` [B, L],
    ``image_ids`` [B] (which image), ``caption_ids`` [B] (which caption record, unique in the dataset),
    ``text_ids`` [B] (which distinct caption string; equal strings share an id); ``image_hashes`` [B] (the
    image file's content hash) when the preprocessing asks for ``content_hashes``.

Evaluation batch, every image once with all of its captions:
    ``pixel_values`` [B, 3, H, W], ``image_ids`` [B],
    ``input_ids`` [T, L], ``attention_mask`` [T, L], ``caption_ids`` [T], ``caption_image_ids`` [T]
    (the image each caption belongs to), ``text_ids`` [T].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Preprocessing:
    """What the data pipeline needs from the towers.

    Attributes:
        train_transform: PIL RGB image -> float tensor [3, H, W], with training augmentation.
        eval_transform: PIL RGB image -> float tensor [3, H, W], deterministic.
        tokenize: list of captions -> ``{"input_ids": [T, L], "attention_mask": [T, L]}``, padded to the
            longest caption and truncated to the tower's maximum length.
        train_transform_is_deterministic: True when ``train_transform`` is ``eval_transform`` (no
            augmentation), so features of a locked tower may be cached across epochs.
        content_hashes: Training batches must carry ``image_hashes`` [B] (int64, see
            :func:`pefttune.losses.image_content_hash`): the loss identifies images by their file's bytes
            (DueT's ``image_identity="content"``), so byte-identical files under two ids are one image.
    """

    train_transform: ImageTransform
    eval_transform: ImageTransform
    tokenize: Tokenize
    train_transform_is_deterministic: bool = False
    content_hashes: bool = False
