"""Retrieval pictures: text queries with their top-k images, image queries with their top-k captions.

Three layers, each usable alone:

* Pure functions. :func:`mark_correct` says which retrieved items are relevant;
  :func:`text_to_image_figure`, :func:`image_to_text_figure` and :func:`retrieval_figure` draw a
  matplotlib figure from embeddings, ids, captions and images; :func:`save_figure` writes it as PNG.
  The top-k come from :func:`pefttune.metrics.functional.topk_retrieval`.
* :func:`collect_retrieval_examples`: run a model over evaluation batches and keep what the pictures need.
* :class:`RetrievalPictureLogger`: a Lightning callback that logs the picture to TensorBoard after every
  validation, and ``pefttune visualize`` (:func:`main`, also ``python -m pefttune.visualize``), which draws
  it for a trained checkpoint.

Videos (``pixel_values`` [B, T, C, H, W] with a ``frame_mask``) are drawn as a strip of their sampled frames
side by side (:func:`frame_strip`), so a hit shows its motion; the rest of the picture is the same.

Relevance follows the retrieval protocol (``docs/protocol.md``): a retrieved image is correct for a caption
when it is the caption's own image; a retrieved caption is correct for an image when it is one of that
image's captions. Correct items get a green frame (images) or a green check mark (captions), wrong ones red.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from pefttune.metrics.functional import topk_retrieval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pefttune.module import DualEncoderModule

__all__ = [
    "RetrievalExamples",
    "RetrievalPictureLogger",
    "collect_retrieval_examples",
    "frame_strip",
    "image_to_text_figure",
    "main",
    "mark_correct",
    "retrieval_figure",
    "save_figure",
    "text_to_image_figure",
]

CORRECT_COLOR = "#1a9850"
WRONG_COLOR = "#d73027"
# Characters per line of a caption drawn as a title or list item; longer captions wrap, then are cut.
_WRAP = 28
_MAX_LINES = 3

ImageLike = Image.Image | np.ndarray | torch.Tensor


def _figure_class() -> type[Figure]:
    # The object-oriented Figure needs no GUI backend or pyplot state: safe in callbacks and worker threads.
    from matplotlib.figure import Figure

    return Figure


def mark_correct(
    topk_indices: torch.Tensor, query_owner_ids: torch.Tensor, gallery_owner_ids: torch.Tensor
) -> torch.Tensor:
    """Which retrieved gallery items are relevant to their query.

    Both directions reduce to one rule: a retrieved item is correct when it belongs to the same image as the
    query. For text -> image, query owners are the captions' image ids and gallery owners the images' ids;
    for image -> text, query owners are the images' ids and gallery owners the captions' image ids.

    Args:
        topk_indices: Rows of the gallery retrieved for each query [N_q, K] (from ``topk_retrieval``).
        query_owner_ids: The image id each query belongs to [N_q].
        gallery_owner_ids: The image id each gallery item belongs to [N_g].

    Returns:
        A boolean tensor [N_q, K], True where the retrieved item is relevant.

    Raises:
        ValueError: If the shapes do not line up or an index is out of the gallery's range.
    """
    if topk_indices.ndim != 2 or topk_indices.shape[0] != query_owner_ids.shape[0]:
        raise ValueError(
            f"topk_indices must be [N_q, K] with N_q = {query_owner_ids.shape[0]} queries, "
            f"got shape {tuple(topk_indices.shape)}"
        )
    if topk_indices.numel() and (
        int(topk_indices.min()) < 0 or int(topk_indices.max()) >= len(gallery_owner_ids)
    ):
        raise ValueError(f"topk_indices must index a gallery of {len(gallery_owner_ids)} items")
    owners = gallery_owner_ids.to(topk_indices.device)[topk_indices]
    return owners == query_owner_ids.to(topk_indices.device)[:, None]


def _to_display(image: ImageLike) -> np.ndarray:
    """An image as an array matplotlib can show: PIL as is, tensors [3, H, W] rescaled to [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.dtype == np.uint8:
        return array
    # Normalised model inputs have arbitrary range: stretch each image to [0, 1] so it is recognisable.
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def frame_strip(frames: Sequence[ImageLike], max_frames: int = 4, gap: int = 2) -> Image.Image:
    """A video's frames side by side, in time order, as one RGB image (a retrieval picture's video "image").

    Args:
        frames: The frames (PIL images, HWC uint8 arrays or CHW tensors), in time order.
        max_frames: Show at most this many, evenly spaced (first and last included).
        gap: Dark pixels between frames.

    Returns:
        The strip: frames scaled to the first frame's height.

    Raises:
        ValueError: If there is no frame or ``max_frames < 1``.
    """
    if not frames:
        raise ValueError("frame_strip needs at least one frame")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if len(frames) > max_frames:
        picks = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[int(i)] for i in picks]
    pictures = []
    for frame in frames:
        array = _to_display(frame)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        pictures.append(Image.fromarray(array).convert("RGB"))
    height = pictures[0].height
    pictures = [
        p if p.height == height else p.resize((round(p.width * height / p.height), height)) for p in pictures
    ]
    strip = Image.new(
        "RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), height), (40, 40, 40)
    )
    left = 0
    for picture in pictures:
        strip.paste(picture, (left, 0))
        left += picture.width + gap
    return strip


def _wrap(text: str, width: int = _WRAP, lines: int = _MAX_LINES) -> str:
    return "\n".join(textwrap.wrap(text, width=width, max_lines=lines, placeholder=" ...")) or " "


def _check_queries(queries: Sequence[int], count: int, what: str) -> list[int]:
    chosen = [int(q) for q in queries]
    bad = [q for q in chosen if not 0 <= q < count]
    if bad:
        raise ValueError(f"{what} query rows {bad} are out of range (there are {count})")
    if not chosen:
        raise ValueError(f"at least one {what} query is needed")
    return chosen


def _frame(axis: Any, color: str) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(4)


def text_to_image_figure(
    text_embeds: torch.Tensor,
    caption_image_ids: torch.Tensor,
    captions: Sequence[str],
    image_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    images: Sequence[ImageLike],
    *,
    queries: Sequence[int] = (0, 1, 2, 3),
    k: int = 5,
    figure: Figure | None = None,
) -> Figure:
    """One row per caption query: the caption, then its top-k images framed green (correct) or red.

    Args:
        text_embeds: L2-normalised caption embeddings [N_txt, D].
        caption_image_ids: The image id of each caption [N_txt].
        captions: The caption strings, aligned with ``text_embeds``.
        image_embeds: L2-normalised image embeddings [N_img, D].
        image_ids: The id of each image [N_img].
        images: The images (PIL, uint8 HWC arrays, or CHW tensors), aligned with ``image_embeds``.
        queries: Rows of ``text_embeds`` to draw, top to bottom.
        k: Images shown per query (capped at the number of images).
        figure: Draw into this figure instead of a new one.

    Returns:
        The matplotlib figure.
    """
    rows = _check_queries(queries, len(captions), "caption")
    if len(images) != image_embeds.shape[0]:
        raise ValueError(f"{len(images)} images for {image_embeds.shape[0]} image embeddings")
    query = text_embeds[rows]
    scores, indices = topk_retrieval(query, image_embeds, k)
    correct = mark_correct(indices, caption_image_ids[rows], image_ids)
    k = indices.shape[1]
    fig = figure or _figure_class()(figsize=(2.0 * (k + 1.5), 2.1 * len(rows)))
    grid = fig.add_gridspec(len(rows), k + 1, width_ratios=[1.5] + [1.0] * k)
    for r, row in enumerate(rows):
        text_axis = fig.add_subplot(grid[r, 0])
        text_axis.axis("off")
        text_axis.text(0.0, 0.5, _wrap(captions[row]), va="center", ha="left", fontsize=9, wrap=True)
        for c in range(k):
            axis = fig.add_subplot(grid[r, c + 1])
            axis.imshow(_to_display(images[int(indices[r, c])]))
            color = CORRECT_COLOR if bool(correct[r, c]) else WRONG_COLOR
            _frame(axis, color)
            axis.set_title(f"#{c + 1}  {float(scores[r, c]):.2f}", fontsize=8, color=color)
    fig.suptitle(f"Text -> image: top-{k} images per caption (green = the caption's image)", fontsize=10)
    return fig


def image_to_text_figure(
    image_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    images: Sequence[ImageLike],
    text_embeds: torch.Tensor,
    caption_image_ids: torch.Tensor,
    captions: Sequence[str],
    *,
    queries: Sequence[int] = (0, 1, 2, 3),
    k: int = 5,
    figure: Figure | None = None,
) -> Figure:
    """One row per image query: the image, then its top-k captions, checked (correct) or crossed.

    Args:
        image_embeds: L2-normalised image embeddings [N_img, D].
        image_ids: The id of each image [N_img].
        images: The images, aligned with ``image_embeds``.
        text_embeds: L2-normalised caption embeddings [N_txt, D].
        caption_image_ids: The image id of each caption [N_txt].
        captions: The caption strings, aligned with ``text_embeds``.
        queries: Rows of ``image_embeds`` to draw, top to bottom.
        k: Captions listed per query (capped at the number of captions).
        figure: Draw into this figure instead of a new one.

    Returns:
        The matplotlib figure.
    """
    rows = _check_queries(queries, image_embeds.shape[0], "image")
    if len(captions) != text_embeds.shape[0]:
        raise ValueError(f"{len(captions)} captions for {text_embeds.shape[0]} caption embeddings")
    scores, indices = topk_retrieval(image_embeds[rows], text_embeds, k)
    correct = mark_correct(indices, image_ids[rows], caption_image_ids)
    k = indices.shape[1]
    fig = figure or _figure_class()(figsize=(9.0, max(2.0, 0.42 * (k + 1)) * len(rows)))
    grid = fig.add_gridspec(len(rows), 2, width_ratios=[1.0, 3.2])
    for r, row in enumerate(rows):
        image_axis = fig.add_subplot(grid[r, 0])
        image_axis.imshow(_to_display(images[row]))
        _frame(image_axis, "#777777")
        list_axis = fig.add_subplot(grid[r, 1])
        list_axis.axis("off")
        for c in range(k):
            ok = bool(correct[r, c])
            line = _wrap(captions[int(indices[r, c])], width=60, lines=1)
            list_axis.text(
                0.0,
                1.0 - (c + 0.5) / k,
                f"{'✓' if ok else '✗'} #{c + 1} ({float(scores[r, c]):.2f})  {line}",
                va="center",
                ha="left",
                fontsize=9,
                color=CORRECT_COLOR if ok else WRONG_COLOR,
            )
    fig.suptitle(
        f"Image -> text: top-{k} captions per image (green = one of the image's captions)", fontsize=10
    )
    return fig


@dataclass
class RetrievalExamples:
    """Everything a retrieval picture needs, aligned row by row.

    Attributes:
        image_embeds: L2-normalised image embeddings [N_img, D].
        image_ids: Image ids [N_img].
        images: The images (PIL), aligned with ``image_embeds``.
        text_embeds: L2-normalised caption embeddings [N_txt, D].
        caption_image_ids: The image id of each caption [N_txt].
        captions: The caption strings, aligned with ``text_embeds``.
    """

    image_embeds: torch.Tensor
    image_ids: torch.Tensor
    images: list[ImageLike]
    text_embeds: torch.Tensor
    caption_image_ids: torch.Tensor
    captions: list[str]


def retrieval_figure(
    examples: RetrievalExamples, *, num_queries: int = 4, k: int = 5, seed: int | None = 0
) -> Figure:
    """Both directions in one figure: caption queries on top, image queries below.

    Args:
        examples: Embeddings, ids, images and captions (see :class:`RetrievalExamples`).
        num_queries: Queries drawn per direction (capped at what is available).
        k: Items retrieved per query.
        seed: Picks the queries at random with this seed (one caption of distinct images);
            ``None`` takes the first images and their first captions.

    Returns:
        The matplotlib figure.
    """
    image_rows, caption_rows = pick_queries(examples, num_queries, seed)
    k_t2i = min(k, examples.image_embeds.shape[0])
    k_i2t = min(k, examples.text_embeds.shape[0])
    top_height = 2.1 * len(caption_rows)
    bottom_height = max(2.0, 0.42 * (k_i2t + 1)) * len(image_rows)
    fig = _figure_class()(figsize=(max(2.0 * (k_t2i + 1.5), 9.0), top_height + bottom_height + 0.6))
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, bottom_height])
    text_to_image_figure(
        examples.text_embeds,
        examples.caption_image_ids,
        examples.captions,
        examples.image_embeds,
        examples.image_ids,
        examples.images,
        queries=caption_rows,
        k=k,
        figure=top,
    )
    image_to_text_figure(
        examples.image_embeds,
        examples.image_ids,
        examples.images,
        examples.text_embeds,
        examples.caption_image_ids,
        examples.captions,
        queries=image_rows,
        k=k,
        figure=bottom,
    )
    return fig


def pick_queries(
    examples: RetrievalExamples, num_queries: int, seed: int | None = 0
) -> tuple[list[int], list[int]]:
    """Image rows and caption rows to use as queries: distinct images, one of each image's captions.

    Args:
        examples: The evaluation examples.
        num_queries: How many queries per direction (capped at the number of images).
        seed: Random choice with this seed; ``None`` takes the first images and their first captions.

    Returns:
        ``(image_rows, caption_rows)``.
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be positive, got {num_queries}")
    n_img = examples.image_embeds.shape[0]
    count = min(num_queries, n_img)
    generator = np.random.default_rng(seed) if seed is not None else None
    image_rows = (
        sorted(generator.choice(n_img, size=count, replace=False).tolist())
        if generator is not None
        else list(range(count))
    )
    # Caption queries come from other images when there are enough, so the two halves show different scenes.
    others = [i for i in range(n_img) if i not in image_rows]
    caption_images = (
        sorted(generator.choice(others, size=count, replace=False).tolist())
        if generator is not None and len(others) >= count
        else image_rows
    )
    caption_rows = []
    owners = examples.caption_image_ids.tolist()
    for row in caption_images:
        image_id = int(examples.image_ids[row])
        candidates = [j for j, owner in enumerate(owners) if owner == image_id]
        pick = int(generator.integers(len(candidates))) if generator is not None else 0
        caption_rows.append(candidates[pick])
    return image_rows, caption_rows


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 100) -> str:
    """Write a figure as PNG (creating the folder) and return the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------------------
# From a model and data


def _records_of(datamodule: Any, role: str) -> list[Any] | None:
    getter = getattr(datamodule, "records", None)
    if getter is None:
        return None
    try:
        return list(getter(role))
    except (ValueError, KeyError, RuntimeError):
        return None


@torch.no_grad()
def collect_retrieval_examples(
    module: DualEncoderModule,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    max_images: int = 32,
    records: Sequence[Any] | None = None,
    captions: Sequence[str] | None = None,
) -> RetrievalExamples:
    """Encode evaluation batches (as the strategy evaluates) until ``max_images`` images are collected.

    Args:
        module: The model (put in eval mode by the caller; validation already is).
        batches: Evaluation-layout batches (``pefttune.data.preprocessing``).
        max_images: Stop after this many images; the gallery of the picture is these images and their
            captions only, so ranks in the picture are not the ranks of the full evaluation.
        records: The split's :class:`~pefttune.data.records.ImageCaptionRecord` list, indexed by the batch's
            ``image_ids`` (the data module's evaluation ids are record positions): gives the original
            images and caption strings. Without it, the model inputs are shown (stretched to [0, 1]) and
            ``captions`` must be given.
        captions: The split's captions indexed by ``caption_ids``, when ``records`` is not given.

    Returns:
        The collected :class:`RetrievalExamples`.
    """
    from pefttune.data.datasets import load_image

    if records is None and captions is None:
        raise ValueError("give records (preferred) or captions to draw a retrieval picture")
    device = module.device
    image_parts, id_parts, text_parts, owner_parts = [], [], [], []
    images: list[ImageLike] = []
    texts: list[str] = []
    collected = 0
    for batch in batches:
        if "labels" in batch or collected >= max_images:
            break
        take = min(max_images - collected, batch["image_ids"].shape[0])
        keep_ids = batch["image_ids"][:take]
        keep_captions = torch.isin(batch["caption_image_ids"], keep_ids)
        pixel_values = batch["pixel_values"][:take].to(device)
        video = "frame_mask" in batch
        frame_mask = batch["frame_mask"][:take] if video else None
        shown_items = {"pixel_values": pixel_values}
        if frame_mask is not None:
            shown_items["frame_mask"] = frame_mask.to(device)
        image_embeds = module.evaluation_image_embeddings(shown_items)
        text_embeds = module.strategy.evaluation_text_embeddings(
            module,
            batch["input_ids"][keep_captions].to(device),
            batch["attention_mask"][keep_captions].to(device),
        )
        image_parts.append(image_embeds.float().cpu())
        id_parts.append(keep_ids.cpu())
        text_parts.append(text_embeds.float().cpu())
        owner_parts.append(batch["caption_image_ids"][keep_captions].cpu())
        if records is not None:
            # The evaluation collate lists every image's captions in record order, image after image: all
            # of them, or only the record's eval_caption under the one-caption protocol.
            kept = [records[int(i)] for i in keep_ids.tolist()]
            shown = Counter(batch["caption_image_ids"][keep_captions].tolist())
            for row, (image_id, record) in enumerate(zip(keep_ids.tolist(), kept, strict=True)):
                if video:
                    indices = [int(i) for i in batch["frame_indices"][row][frame_mask[row]].tolist()]
                    images.append(frame_strip(record.image.read_frames(indices)))
                else:
                    images.append(load_image(record.image))
                texts += _record_captions(record, shown[image_id])
        elif video:
            images += [
                frame_strip(list(clip[mask]))
                for clip, mask in zip(pixel_values.cpu(), frame_mask, strict=True)
            ]
        else:
            images += list(batch["pixel_values"][:take].cpu())
            texts += [captions[c] for c in batch["caption_ids"][keep_captions].tolist()]  # type: ignore[index]
        collected += take
    if not collected:
        raise ValueError("no retrieval batch to draw from")
    return RetrievalExamples(
        image_embeds=torch.cat(image_parts),
        image_ids=torch.cat(id_parts),
        images=images,
        text_embeds=torch.cat(text_parts),
        caption_image_ids=torch.cat(owner_parts),
        captions=texts,
    )


def _record_captions(record: Any, count: int) -> list[str]:
    """The captions of ``record`` an evaluation batch holds: all of them, or its ``eval_caption`` alone."""
    if count == len(record.captions):
        return list(record.captions)
    if count == 1:
        return [record.captions[getattr(record, "eval_caption", 0)]]
    raise ValueError(
        f"{record.describe()}: the batch holds {count} of its {len(record.captions)} captions; expected "
        "all of them or one (the eval_captions protocols)"
    )


class RetrievalPictureLogger(Callback):
    """Log a retrieval picture to TensorBoard at the end of every validation.

    The picture shows ``num_queries`` caption queries with their top-``k`` images and ``num_queries`` image
    queries with their top-``k`` captions, among the first ``max_images`` validation images (a small
    gallery, so the picture is cheap and readable; its ranks are not the full evaluation's). The queries are
    the same at every validation (fixed ``seed``), so successive pictures show how retrieval improves. Other
    loggers than TensorBoard are ignored, as is validation without a logger.

    Add it in a config with ``trainer.callbacks: [{class_path: pefttune.visualize.RetrievalPictureLogger}]``.

    Args:
        num_queries: Queries per direction.
        k: Items retrieved per query.
        max_images: Validation images encoded for the picture.
        tag: TensorBoard tag of the figure.
        seed: Seed of the query choice.
    """

    def __init__(
        self,
        num_queries: int = 4,
        k: int = 5,
        max_images: int = 32,
        tag: str = "val/retrieval",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.k = k
        self.max_images = max_images
        self.tag = tag
        self.seed = seed
        self.logged_steps: list[int] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Encode a few validation images and captions, draw, and add the figure to TensorBoard."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        experiment = _tensorboard_experiment(trainer)
        if experiment is None:
            return
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return
        records = _records_of(trainer.datamodule, "val") if trainer.datamodule is not None else None
        if records is None:
            return
        examples = collect_retrieval_examples(
            pl_module,  # type: ignore[arg-type]
            loader,
            max_images=self.max_images,
            records=records,
        )
        figure = retrieval_figure(examples, num_queries=self.num_queries, k=self.k, seed=self.seed)
        experiment.add_figure(self.tag, figure, global_step=trainer.global_step, close=False)
        self.logged_steps.append(trainer.global_step)


def _tensorboard_experiment(trainer: Trainer) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_datamodule_from_config(config_path: str, overrides: Sequence[str] = ()) -> Any:
    """Instantiate the ``data`` section of a fit config, with the CLI's own parser."""
    from pefttune.cli import parse_config

    return parse_config(config_path, overrides, build_data=True)[1]


def main(argv: Sequence[str] | None = None) -> str | None:
    """``pefttune visualize --config FILE [--ckpt_path CKPT] [--output retrieval.png] [overrides]``.

    Builds the model and the data module from a fit config with the same parser as ``pefttune fit``
    (several ``--config``, shipped config names, dotted overrides, ``--print_config``, the config's seed),
    loads the checkpoint's weights (none: the untrained model), encodes the first ``--max_images`` images of
    the split, draws and writes the PNG. Also ``python -m pefttune.visualize``.

    Returns:
        The path of the PNG (None after ``--print_config``).
    """
    from pefttune.checkpointing import load_checkpoint_weights
    from pefttune.cli import parse_config

    parser = argparse.ArgumentParser(prog="pefttune visualize", description=main.__doc__)
    parser.add_argument("--config", "-c", action="append", required=True, help="the fit config of the model")
    parser.add_argument(
        "--ckpt_path", default=None, help="a Lightning checkpoint; omit for the untrained model"
    )
    parser.add_argument("--output", "-o", default="retrieval.png", help="the PNG to write")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="the evaluation split")
    parser.add_argument("--num_queries", type=int, default=4, help="queries per direction")
    parser.add_argument("--k", type=int, default=5, help="items retrieved per query")
    parser.add_argument("--max_images", type=int, default=64, help="images in the picture's gallery")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query choice")
    parser.add_argument(
        "--strict",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        default=True,
        help="require the checkpoint's keys to match the model exactly (default true)",
    )
    options, overrides = parser.parse_known_args(argv)

    # The config's seed_everything is applied before the model is built (the same random heads as training).
    model, datamodule, _ = parse_config(options.config, overrides, build_data=True)
    if options.ckpt_path:
        load_checkpoint_weights(model, options.ckpt_path, strict=options.strict)
    model.eval()
    datamodule.attach_preprocessing(model.preprocessing)
    stage = "test" if options.split == "test" else "validate"
    datamodule.setup(stage)
    records = datamodule.records(options.split)
    model.strategy.on_evaluation_start(model, datamodule.evaluation_texts(stage))
    loader = datamodule.test_dataloader() if options.split == "test" else datamodule.val_dataloader()
    examples = collect_retrieval_examples(model, loader, max_images=options.max_images, records=records)
    figure = retrieval_figure(examples, num_queries=options.num_queries, k=options.k, seed=options.seed)
    path = save_figure(figure, options.output)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
