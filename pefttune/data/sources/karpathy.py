"""Karpathy-split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``, UCM-Captions)."""

from __future__ import annotations

import os
from typing import Any

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.files import FileSource, parse_json, read_text, string_value


class Karpathy(FileSource):
    """Karpathy-split JSON: ``images[].{filepath?, filename, split, sentences[].raw, cocoid?, imgid?}``.

    The image id is ``cocoid``, else ``imgid``, else the image's relative path; the label is the optional
    ``class`` key (UCM-Captions has it). The file carries its own splits (``train``, ``val``, ``test``,
    ``restval``).

    Args:
        path: The JSON file.
        image_root: Folder that ``filepath/filename`` is relative to; None means the JSON file's folder.
        restval_split: Split that ``restval`` images join (``"train"`` gives the usual 113k COCO training
            images); None keeps them as ``"restval"``.
        check_files: Check at setup that image files exist.
    """

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        restval_split: str | None = "train",
        check_files: bool = True,
    ) -> None:
        super().__init__(path, image_root, check_files)
        self.restval_split = restval_split

    def read(self, split: str, policy: ErrorPolicy, parsed: Any = None) -> list[ImageCaptionRecord]:
        """Every image of the file, all splits, in file order (``split`` is unused: the file has its own)."""
        path = self.path
        data = parsed if parsed is not None else parse_json(read_text(path), path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataFormatError(
                f"{path}: expected a JSON object with an 'images' list "
                "(Karpathy split format: images[].{filename, split, sentences[].raw})"
            )
        records: list[ImageCaptionRecord] = []
        for index, entry in enumerate(data["images"]):
            where = f"{path}, images[{index}]"
            if not isinstance(entry, dict):
                policy.fail("bad_value", f"{where}: expected an object, got {type(entry).__name__}")
                continue
            filepath = entry.get("filepath") or ""
            filename = entry.get("filename")
            relative = os.path.join(filepath, filename) if isinstance(filename, str) and filename else None
            image_id = string_value(entry.get("cocoid")) or string_value(entry.get("imgid")) or relative
            name = f"{where} (image id {image_id!r})" if image_id else where
            missing = [key for key in ("filename", "split", "sentences") if key not in entry]
            if missing:
                policy.fail(
                    "missing_key",
                    f"{name}: missing key {missing[0]!r} (expected filename, split and sentences[].raw)",
                )
                continue
            if relative is None or not isinstance(filepath, str):
                policy.fail("bad_value", f"{name}: 'filename' and 'filepath' must be non-empty strings")
                continue
            own_split = string_value(entry["split"])
            if own_split is None:
                policy.fail(
                    "bad_value", f"{name}: 'split' must be a non-empty string, got {entry['split']!r}"
                )
                continue
            if own_split == "restval" and self.restval_split is not None:
                own_split = self.restval_split
            sentences = entry["sentences"]
            if not isinstance(sentences, list):
                policy.fail(
                    "bad_value", f"{name}: 'sentences' must be a list, got {type(sentences).__name__}"
                )
                continue
            captions: list[Any] = []
            for position, sentence in enumerate(sentences):
                if not isinstance(sentence, dict) or "raw" not in sentence:
                    policy.fail("bad_caption", f"{name}: sentences[{position}] has no key 'raw'")
                    continue
                captions.append(sentence["raw"])
            records.append(
                ImageCaptionRecord(
                    image_id=str(image_id),
                    image=self.resolve(relative),
                    captions=captions,
                    split=own_split,
                    label=string_value(entry.get("class")),
                    origin=where,
                )
            )
        return records
