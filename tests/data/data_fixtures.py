"""Helpers for the data tests: a trivial tokenizer, a tiny image transform and fixture-file writers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class WhitespaceTokenizer:
    """Splits on whitespace, numbers words in order of appearance, pads and truncates to ``max_length``."""

    def __init__(self, max_length: int = 16) -> None:
        self.max_length = max_length
        self.vocabulary: dict[str, int] = {}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [
            [self.vocabulary.setdefault(word, len(self.vocabulary) + 1) for word in caption.split()][
                : self.max_length
            ]
            for caption in captions
        ]
        length = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def to_tensor_8px(image: Image.Image) -> torch.Tensor:
    """A deterministic image transform: resize to 8x8, scale to [0, 1]."""
    array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def write_image(
    path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 8, fmt: str = "JPEG"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, fmt)
    return path


def jpeg_bytes(colour: tuple[int, int, int] = (10, 200, 10), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write an uncompressed tar with the given (name, data) members, in order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, num_shards: int = 2, per_shard: int = 3, captions: int = 2) -> list[str]:
    """Write shards ``shard-000.tar``, ...: keys ``s{shard}-{i}``, each a JPEG and a JSON caption list."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(num_shards):
        members = []
        for i in range(per_shard):
            key = f"s{shard}-{i}"
            keys.append(key)
            meta = {"captions": [f"caption {j} of {key}" for j in range(captions)], "label": f"class{i % 2}"}
            members.append((f"{key}.jpg", jpeg_bytes((20 * i, 50 * shard, 100))))
            members.append((f"{key}.json", json.dumps(meta).encode()))
        write_tar(folder / f"shard-{shard:03d}.tar", members)
    return keys


def write_karpathy(path: Path, images: list[dict], image_dir: Path | None = None) -> Path:
    """Write a Karpathy JSON; entries without 'filename' get none, images are created in ``image_dir``."""
    for entry in images:
        if image_dir is not None and "filename" in entry:
            write_image(image_dir / entry.get("filepath", "") / entry["filename"])
    path.write_text(json.dumps({"dataset": "test", "images": images}))
    return path


def karpathy_entry(name: str, split: str, captions: list[str], **extra: object) -> dict:
    return {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions], **extra}


# ---------------------------------------------------------------------------------------------------------
# Reading a source the way the data module does (validation included), with keyword names of the tests.


def read_source(source, split: str = "train", on_error: str = "raise", report=None) -> list:
    """``source.records(split, policy)``: what the data module reads from a source, validated."""
    from pefttune.data.records import ErrorPolicy

    return source.records(split, ErrorPolicy(on_error, report))


def read_karpathy_json(path: str, *, split: str = "train", on_error: str = "raise", report=None, **options):
    from pefttune.data.sources import Karpathy

    return read_source(Karpathy(path, **options), split, on_error, report)


def read_coco_json(path: str, *, split: str = "train", on_error: str = "raise", report=None, **options):
    from pefttune.data.sources import Coco

    return read_source(Coco(path, **options), split, on_error, report)


def read_csv(path: str, *, split: str = "train", on_error: str = "raise", report=None, **options):
    from pefttune.data.sources import Table

    return read_source(Table(path, format="csv", **options), split, on_error, report)


def _json_table(fmt: str, path: str, split: str, on_error: str, report, options: dict):
    from pefttune.data.sources import Table

    renamed = {"image_key": "image_column", "caption_key": "caption_column", "id_key": "group_column"}
    renamed |= {"split_key": "split_column", "label_key": "label_column"}
    options = {renamed.get(key, key): value for key, value in options.items()}
    return read_source(Table(path, format=fmt, **options), split, on_error, report)


def read_jsonl(path: str, *, split: str = "train", on_error: str = "raise", report=None, **options):
    return _json_table("jsonl", path, split, on_error, report, options)


def read_json_list(path: str, *, split: str = "train", on_error: str = "raise", report=None, **options):
    return _json_table("json_list", path, split, on_error, report, options)


def read_webdataset(pattern: str, *, split: str = "train", on_error: str = "raise", report=None):
    from pefttune.data.sources import WebDataset

    return read_source(WebDataset(pattern), split, on_error, report)


def read_records(path: str, format: str = "auto", **options) -> list:
    """Read a path given in the deprecated string form (``source: <path>`` plus ``format``)."""
    import warnings

    from pefttune.data.datamodule import ImageTextDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = ImageTextDataModule(source=path, format=format, **options)
    return read_source(module.sources["train"])
