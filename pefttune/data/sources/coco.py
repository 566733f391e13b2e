"""COCO captions JSON (``captions_val2014.json``, ``coco_test_karpathy.json``, ...)."""

from __future__ import annotations

from typing import Any

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.files import FileSource, parse_json, read_text, string_value


class Coco(FileSource):
    """COCO captions JSON: ``images[].{id, file_name}`` and ``annotations[].{image_id, caption}``.

    Annotations are grouped by ``image_id`` into one record per image, in the order of ``images``. A COCO file
    holds one split: its records get the split they are read for (give the validation and test files as
    ``val_source`` / ``test_source``).

    Args:
        path: The JSON file.
        image_root: Folder ``file_name`` is relative to; None means the JSON file's folder.
        check_files: Check at setup that image files exist.
    """

    def read(self, split: str, policy: ErrorPolicy, parsed: Any = None) -> list[ImageCaptionRecord]:
        """One record per listed image, all in ``split``."""
        path = self.path
        data = parsed if parsed is not None else parse_json(read_text(path), path)
        if not isinstance(data, dict):
            raise DataFormatError(
                f"{path}: expected a JSON object with 'images' and 'annotations' lists (COCO)"
            )
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DataFormatError(
                    f"{path}: missing list {key!r} (COCO captions format: images, annotations)"
                )
        by_id: dict[str, ImageCaptionRecord] = {}
        for index, entry in enumerate(data["images"]):
            where = f"{path}, images[{index}]"
            if not isinstance(entry, dict):
                policy.fail("bad_value", f"{where}: expected an object, got {type(entry).__name__}")
                continue
            missing = [key for key in ("id", "file_name") if key not in entry]
            if missing:
                policy.fail("missing_key", f"{where}: missing key {missing[0]!r} (expected id and file_name)")
                continue
            image_id = string_value(entry["id"])
            file_name = entry["file_name"]
            if image_id is None or not isinstance(file_name, str) or not file_name:
                policy.fail("bad_value", f"{where}: 'id' must be an int or string and 'file_name' a string")
                continue
            if image_id in by_id:
                policy.fail(
                    "duplicate_image_id",
                    f"{where}: duplicate image id {image_id!r}, already used by {by_id[image_id].origin}",
                )
                continue
            by_id[image_id] = ImageCaptionRecord(
                image_id=image_id, image=self.resolve(file_name), captions=[], split=split, origin=where
            )
        for index, annotation in enumerate(data["annotations"]):
            where = f"{path}, annotations[{index}]"
            if not isinstance(annotation, dict):
                policy.fail("bad_caption", f"{where}: expected an object, got {type(annotation).__name__}")
                continue
            missing = [key for key in ("image_id", "caption") if key not in annotation]
            if missing:
                policy.fail(
                    "bad_caption", f"{where}: missing key {missing[0]!r} (expected image_id and caption)"
                )
                continue
            image_id = string_value(annotation["image_id"])
            if image_id not in by_id:
                policy.fail(
                    "unknown_image_id", f"{where}: image_id {annotation['image_id']!r} is not in 'images'"
                )
                continue
            by_id[image_id].captions.append(annotation["caption"])
        return list(by_id.values())
