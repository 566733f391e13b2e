"""Video batches for the tests: generated clips rendered through a tower's transform, in the data layer's layout."""

from __future__ import annotations

import torch

from pefttune.data.sources.synthetic_video import Clip, SyntheticVideos, clip_captions, render_clip


def clips(split: str, count: int, *, num_frames: int = 4, motions=None, seed: int = 0) -> list[Clip]:
    """``count`` generated clips of ``split``."""
    source = SyntheticVideos(
        num_train=count,
        num_val=count,
        num_test=count,
        num_frames=num_frames,
        image_size=32,
        seed=seed,
        motions=motions,
    )
    return [source.clip(split, index) for index in range(count)]


def pixels(image_tower, clip_list: list[Clip], train: bool = False) -> torch.Tensor:
    """Frames of each clip through the tower's transform: [B, T, C, H, W]."""
    transform = image_tower.image_transform(train=train)
    size = image_tower.image_size
    return torch.stack([torch.stack([transform(frame) for frame in render_clip(c, size)]) for c in clip_list])


def video_batch(model, clip_list: list[Clip], *, caption: int = 0, ids=None, frame_mask=None) -> dict:
    """A training-layout video batch (``pixel_values`` [B, T, C, H, W], ``frame_mask``, ``frame_indices``)."""
    values = pixels(model.image_tower, clip_list)
    size, length = values.shape[:2]
    mask = torch.ones(size, length, dtype=torch.bool) if frame_mask is None else frame_mask
    indices = torch.where(mask, torch.arange(length).expand(size, length), torch.full((size, length), -1))
    ids = torch.arange(size) if ids is None else torch.as_tensor(ids)
    tokens = model.text_tower.tokenize([clip_captions(c)[caption] for c in clip_list])
    return {
        "pixel_values": values,
        "frame_mask": mask,
        "frame_indices": indices,
        "image_ids": ids,
        "text_ids": torch.arange(size),
        # Evaluation layout too: one caption per clip, in clip order.
        "caption_ids": torch.arange(size),
        "caption_image_ids": ids,
        **tokens,
    }
