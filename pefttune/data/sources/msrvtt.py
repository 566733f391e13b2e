"""MSR-VTT video-text retrieval: its own ``videodatainfo`` JSON and the CLIP4Clip split files.

Annotation JSON (MSR-VTT's ``videodatainfo`` layout, also CLIP4Clip's ``MSRVTT_data.json``)::

    {"videos": [{"video_id": "video4", "split": "train", ...}, ...],
     "sentences": [{"video_id": "video4", "caption": "a girl wearing a black shirt", "sen_id": 29620}, ...]}

Split files (CLIP4Clip, ``ArrowLuo/CLIP4Clip`` ``dataloaders/dataloader_msrvtt_retrieval.py``):

- ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``: a ``video_id`` column; the captions come from the
  annotation JSON (every sentence of each listed video; CLIP4Clip's ``--expand_msrvtt_sentences`` trains on
  all of them, which is ``captions_per_image="all"`` here).
- ``MSRVTT_JSFUSION_test.csv`` (the 1k-A test): columns ``key, vid_key, video_id, sentence``, one sentence
  per video. Its records carry that sentence as the caption of the one-caption protocol
  (``eval_captions="one"``); with an annotation JSON too, the other sentences of the video are kept for the
  ``"all"`` protocol.

Media: each video is a frame folder or a video file under ``media_root`` (default: the folder of the
annotation file, else of the split file), looked up in this order: ``frames/<video_id>/``,
``videos/<video_id>.<ext>``, ``<video_id>/``, ``<video_id>.<ext>`` (``ext``: mp4, webm, avi, mkv, mov).
``media="frames"`` or ``"videos"`` restricts the lookup to folders or files.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from typing import Any, Literal

from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord
from pefttune.data.sources.base import Source
from pefttune.data.sources.files import parse_json, read_text, string_value
from pefttune.data.video import FrameFolderVideo, Video, VideoFileVideo

Media = Literal["auto", "frames", "videos"]
_VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "avi", "mkv", "mov")


class MSRVTT(Source):
    """MSR-VTT videos with their captions (see the module docstring for the files and the media lookup).

    Without ``split_file`` the records get each video's own ``split`` (``"validate"`` is read as
    ``validate_split``, ``"val"`` by default, the data module's default validation split name). With a
    ``split_file`` the source holds only the listed videos, all in the split they are read for (give the test
    list as ``test_source``, e.g. ``MSRVTT(split_file=MSRVTT_JSFUSION_test.csv, annotations=...)``).

    Args:
        annotations: The ``videodatainfo`` JSON (or ``MSRVTT_data.json``); needed unless the split file holds
            the sentences (JSFUSION test).
        split_file: Optional CLIP4Clip split CSV (``video_id`` column; ``sentence`` column for the 1k-A test).
        media_root: Folder holding the frame folders or video files; None: the annotation file's folder (or
            the split file's).
        media: ``"auto"``, ``"frames"`` (frame folders only) or ``"videos"`` (video files only).
        validate_split: Split name that MSR-VTT's ``"validate"`` videos get.
        check_files: Check at setup that each video's folder or file exists (a missing one is reported as
            ``"missing_video"``).
    """

    def __init__(
        self,
        annotations: str | None = None,
        split_file: str | None = None,
        media_root: str | None = None,
        media: Media = "auto",
        validate_split: str = "val",
        check_files: bool = True,
    ) -> None:
        if annotations is None and split_file is None:
            raise ValueError("MSRVTT needs annotations (the videodatainfo JSON), a split_file, or both")
        if media not in ("auto", "frames", "videos"):
            raise ValueError(f"media must be auto, frames or videos; got {media!r}")
        self.annotations = annotations
        self.split_file = split_file
        base = annotations if annotations is not None else split_file
        self.media_root = (
            media_root if media_root is not None else os.path.dirname(os.path.abspath(str(base)))
        )
        self.media = media
        self.validate_split = validate_split
        self.check_files = check_files

    def describe(self) -> str:
        """The annotation file and split file."""
        return " + ".join(path for path in (self.annotations, self.split_file) if path is not None)

    # -----------------------------------------------------------------------------------------------------

    def candidates(self, video_id: str) -> list[str]:
        """Where a video's frames or file may be, in lookup order."""
        root = self.media_root
        folders = [os.path.join(root, "frames", video_id), os.path.join(root, video_id)]
        files = [os.path.join(root, "videos", f"{video_id}.{ext}") for ext in _VIDEO_EXTENSIONS] + [
            os.path.join(root, f"{video_id}.{ext}") for ext in _VIDEO_EXTENSIONS
        ]
        if self.media == "frames":
            return folders
        if self.media == "videos":
            return files
        return folders[:1] + files[: len(_VIDEO_EXTENSIONS)] + folders[1:] + files[len(_VIDEO_EXTENSIONS) :]

    def video(self, video_id: str, where: str, policy: ErrorPolicy) -> Video | None:
        """The video of an id (a frame folder or a video file), or None after reporting it missing."""
        candidates = self.candidates(video_id)
        for path in candidates:
            if os.path.isdir(path):
                return FrameFolderVideo(path)
            if os.path.isfile(path):
                return VideoFileVideo(path)
        if not self.check_files:
            first = candidates[0]
            return FrameFolderVideo(first) if self.media != "videos" else VideoFileVideo(first)
        policy.fail(
            "missing_video",
            f"{where} (video id {video_id!r}): no frame folder or video file under {self.media_root} (looked "
            f"for {', '.join(os.path.relpath(path, self.media_root) for path in candidates[:3])}, ...; "
            f"media={self.media!r})",
        )
        return None

    def _annotation_captions(
        self, policy: ErrorPolicy
    ) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
        """``{video_id: (split, where)}`` in file order and ``{video_id: [captions]}`` from the JSON."""
        path = str(self.annotations)
        data = parse_json(read_text(path), path)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
            raise DataFormatError(
                f"{path}: expected a JSON object with 'videos' and 'sentences' lists (MSR-VTT videodatainfo: "
                "videos[].{video_id, split}, sentences[].{video_id, caption})"
            )
        if not isinstance(data.get("sentences"), list):
            raise DataFormatError(f"{path}: missing list 'sentences' (sentences[].{{video_id, caption}})")
        videos: dict[str, tuple[str, str]] = {}
        for index, entry in enumerate(data["videos"]):
            where = f"{path}, videos[{index}]"
            if not isinstance(entry, dict) or "video_id" not in entry:
                policy.fail("missing_key", f"{where}: expected an object with 'video_id' and 'split'")
                continue
            video_id = string_value(entry["video_id"])
            split = string_value(entry.get("split"))
            if video_id is None or (split is None and self.split_file is None):
                policy.fail("bad_value", f"{where}: 'video_id' and 'split' must be non-empty strings")
                continue
            if video_id in videos:
                policy.fail(
                    "duplicate_image_id",
                    f"{where}: duplicate video id {video_id!r} (first at {videos[video_id][1]})",
                )
                continue
            videos[video_id] = (self.validate_split if split == "validate" else str(split), where)
        captions: dict[str, list[str]] = {video_id: [] for video_id in videos}
        for index, sentence in enumerate(data["sentences"]):
            where = f"{path}, sentences[{index}]"
            if not isinstance(sentence, dict) or "video_id" not in sentence or "caption" not in sentence:
                policy.fail("bad_caption", f"{where}: expected an object with 'video_id' and 'caption'")
                continue
            video_id = string_value(sentence["video_id"])
            if video_id not in captions:
                policy.fail(
                    "unknown_video_id",
                    f"{where}: caption for unknown video id {sentence['video_id']!r} (not in 'videos')",
                )
                continue
            captions[video_id].append(sentence["caption"])
        return videos, captions

    def _split_rows(self, policy: ErrorPolicy) -> list[tuple[str, str, str | None]]:
        """``(video_id, where, sentence or None)`` per row of the split file."""
        path = str(self.split_file)
        text = read_text(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as err:
            raise DataFormatError(f"{path}, line {reader.line_num}: malformed CSV: {err}") from None
        header = [name.strip() for name in reader.fieldnames or []]
        if "video_id" not in header:
            raise DataFormatError(
                f"{path}: no 'video_id' column (columns: {header}); expected a CLIP4Clip split file such as "
                "MSRVTT_train.9k.csv (video_id) or MSRVTT_JSFUSION_test.csv (key, vid_key, video_id, "
                "sentence)"
            )
        result = []
        for number, row in enumerate(rows, start=1):
            row = {str(key).strip(): value for key, value in row.items()}
            where = f"{path}, row {number}"
            video_id = string_value(row.get("video_id"))
            if video_id is None:
                policy.fail("bad_value", f"{where}: empty video_id")
                continue
            result.append((video_id, where, row.get("sentence") if "sentence" in header else None))
        return result

    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """One record per video (see the class docstring for splits)."""
        videos: dict[str, tuple[str, str]] = {}
        captions: dict[str, list[str]] = {}
        if self.annotations is not None:
            videos, captions = self._annotation_captions(policy)
        records: list[ImageCaptionRecord] = []
        if self.split_file is None:
            for video_id, (own_split, where) in videos.items():
                video = self.video(video_id, where, policy)
                if video is not None:
                    records.append(
                        ImageCaptionRecord(video_id, video, list(captions[video_id]), own_split, origin=where)
                    )
            return records
        seen: Counter[str] = Counter()
        for video_id, where, sentence in self._split_rows(policy):
            seen[video_id] += 1
            if seen[video_id] > 1:
                policy.fail("duplicate_image_id", f"{where}: video id {video_id!r} listed again")
                continue
            known = captions.get(video_id)
            if sentence is None and known is None:
                policy.fail(
                    "unknown_video_id",
                    f"{where}: video id {video_id!r} is not in the annotations {self.annotations}"
                    if self.annotations is not None
                    else f"{where}: the split file has no 'sentence' column, so annotations= (the "
                    "videodatainfo JSON or MSRVTT_data.json) must give the captions",
                )
                continue
            texts: list[Any] = list(known or [])
            eval_caption = 0
            if sentence is not None:
                stripped = [str(text).strip() for text in texts]
                if sentence.strip() in stripped:
                    eval_caption = stripped.index(sentence.strip())
                else:
                    texts.append(sentence)
                    eval_caption = len(texts) - 1
            video = self.video(video_id, where, policy)
            if video is not None:
                records.append(
                    ImageCaptionRecord(video_id, video, texts, split, origin=where, eval_caption=eval_caption)
                )
        return records
