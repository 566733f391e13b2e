"""Image folders for classification: ``root/<class>/**/<image>`` (torchvision's ``ImageFolder`` layout)."""

from __future__ import annotations

import os
from collections import Counter

from torchvision.datasets.folder import find_classes, make_dataset

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.base import Source

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolder(Source):
    """Labelled images in class folders, listed with torchvision's folder helpers.

    Every sub-folder of ``root`` is a class (``torchvision.datasets.folder.find_classes``: hidden ones
    excepted, sorted); its images are found recursively (``make_dataset``) in sorted order. The image id is
    the path relative to ``root``; the single caption is the class name (the record needs one; classification
    does not read it). A folder holds one split: its records get the split they are read for.

    Args:
        root: The folder.
        extensions: File name endings (lower case) counted as images.
    """

    check_files = False  # every path was just listed

    def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = root
        self.extensions = tuple(extensions)

    def describe(self) -> str:
        """The folder."""
        return self.root

    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """One record per image, class folders in sorted order.

        Empty class folders are reported as ``"no_captions"`` (under ``on_error="raise"`` they raise).

        Raises:
            DataFormatError: If ``root`` is not a folder or holds no image in any class folder.
        """
        root = self.root
        if not os.path.isdir(root):
            raise DataFormatError(f"{root}: not a folder (expected root/<class>/<image files>)")
        try:
            classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            raise DataFormatError(f"{root}: no class folders (expected root/<class>/<image files>)") from None

        def is_image(path: str) -> bool:
            return path.lower().endswith(self.extensions) and not os.path.basename(path).startswith(".")

        samples = make_dataset(root, class_to_idx, is_valid_file=is_image, allow_empty=True)
        found = Counter(index for _, index in samples)
        for name in classes:
            if not found[class_to_idx[name]]:
                extensions = ", ".join(self.extensions)
                policy.fail(
                    "no_captions",
                    f"{os.path.join(root, name)}: class folder {name!r} holds no image ({extensions})",
                )
        records = []
        for path, index in samples:
            relative = os.path.relpath(path, root)
            records.append(
                ImageCaptionRecord(
                    image_id=relative.replace(os.sep, "/"),
                    image=path,
                    captions=[classes[index]],
                    split=split,
                    label=classes[index],
                    origin=f"{root}, {relative}",
                )
            )
        if not records:
            raise DataFormatError(
                f"{root}: no images found in class folders (expected root/<class>/<image files>)"
            )
        return records
