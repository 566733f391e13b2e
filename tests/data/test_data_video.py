"""Video sources: frame folders, encoded clips (PyAV), MSR-VTT and CLIP4Clip files, video tables, shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from data_fixtures import WhitespaceTokenizer, read_source, to_tensor_8px, write_image, write_tar
from PIL import Image

from pefttune.data import ImageTextDataModule, Preprocessing
from pefttune.data.datasets import ItemLoader
from pefttune.data.records import DataFormatError, ImageCaptionRecord, SkipReport, VideoLoadError
from pefttune.data.sources import MSRVTT, VideoTable, WebDataset
from pefttune.data.video import FrameFolderVideo, FrameSampler, Video, VideoFileVideo


def grey(level: int) -> tuple[int, int, int]:
    return (level, level, level)


def write_clip(path: Path, num_frames: int = 12, size: int = 32) -> Path:
    """An mpeg4 clip whose frame i is a flat grey of level 20 * i (decodable by the av wheel's FFmpeg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frames(folder: Path, indices: list[int]) -> Path:
    """Frame files named by their index in the source clip (as MSR-VTT frame packs), grey level 20 * i."""
    for index in indices:
        write_image(folder / f"{index:05d}.jpg", grey(20 * index), size=16)
    return folder


def level(image: Image.Image) -> float:
    return float(np.asarray(image).mean())


# ------------------------------------------------------------------------------------------------ sampling


def test_frame_sampler_segments_offsets_and_short_clips():
    sampler = FrameSampler(4)
    assert sampler.indices(12) == [1, 4, 7, 10]  # segment centres: deterministic
    drawn = sampler.indices(12, rng=np.random.default_rng(0))
    assert drawn == sampler.indices(12, rng=np.random.default_rng(0))  # reproducible from the seed
    assert all(3 * k <= i < 3 * (k + 1) for k, i in enumerate(drawn))  # one frame inside each segment
    draws = {tuple(sampler.indices(12, rng=np.random.default_rng(seed))) for seed in range(20)}
    assert len(draws) > 1  # training offsets vary
    assert sampler.indices(3) == [0, 1, 2]  # fewer than T frames: all of them (the rest is padding)
    assert sampler.indices(5) == [0, 1, 3, 4]  # segment centres 0.625, 1.875, 3.125, 4.375
    with pytest.raises(ValueError, match="at least one frame"):
        sampler.indices(0)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        FrameSampler(0)


def test_frame_sampler_linspace_is_clip4clip_s_uniform_choice_in_training_and_evaluation():
    sampler = FrameSampler(4, "linspace")
    # CLIP4Clip (slice_framepos 2): np.linspace(0, n - 1, num=T, dtype=int) -> 0, 3.67, 7.33, 11 truncated.
    assert sampler.indices(12) == [0, 3, 7, 11]
    assert sampler.indices(12, rng=np.random.default_rng(3)) == [0, 3, 7, 11]  # no random offsets
    assert sampler.indices(5) == [0, 1, 2, 4]  # linspace(0, 4, 4) = 0, 1.33, 2.67, 4
    assert sampler.indices(3) == [0, 1, 2]  # shorter than T: every frame, the rest padding
    with pytest.raises(ValueError, match=r"frame sampling must be one of \('segments', 'linspace'\)"):
        FrameSampler(4, "uniform")


def test_frame_folder_order_and_errors(tmp_path):
    folder = write_frames(tmp_path / "v1", [0, 2, 10, 53])  # names sort as numbers
    video = FrameFolderVideo(str(folder))
    assert isinstance(video, Video) and video.num_frames() == 4
    levels = [level(frame) for frame in video.read_frames([0, 1, 2, 1])]
    assert levels == pytest.approx([0, 40, 200, 40], abs=4)  # 00000, 00002, 00010, then 00002 again
    with pytest.raises(VideoLoadError, match=r"frame folder not found: .*missing"):
        FrameFolderVideo(str(tmp_path / "missing")).num_frames()
    with pytest.raises(VideoLoadError, match="frame index 9 out of range for 4"):
        video.read_frames([9])


def test_video_file_decodes_with_pyav_and_bad_files_name_the_path(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", num_frames=12)
    video = VideoFileVideo(str(clip))
    assert video.num_frames() == 12
    frames = video.read_frames([0, 5, 11])
    assert [f.size for f in frames] == [(32, 32)] * 3
    assert [level(f) for f in frames] == pytest.approx([0, 100, 220], abs=6)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoLoadError, match=r"empty \(0 bytes\): .*empty\.mp4"):
        VideoFileVideo(str(tmp_path / "empty.mp4")).num_frames()
    (tmp_path / "corrupt.mp4").write_bytes(b"definitely not a video" * 50)
    with pytest.raises(VideoLoadError, match=r"cannot open video file .*corrupt\.mp4"):
        VideoFileVideo(str(tmp_path / "corrupt.mp4")).num_frames()
    with pytest.raises(VideoLoadError, match=r"video file not found: .*nope\.mp4"):
        VideoFileVideo(str(tmp_path / "nope.mp4")).read_frames([0])


def test_item_loader_pads_short_clips_and_masks_them(tmp_path):
    record = ImageCaptionRecord("v", FrameFolderVideo(str(write_frames(tmp_path / "v", [7]))), ["c"], "train")
    item = ItemLoader(to_tensor_8px, FrameSampler(4))(record)
    assert item["image"].shape == (4, 3, 8, 8)
    assert item["frame_mask"].tolist() == [True, False, False, False]
    assert item["frame_indices"].tolist() == [0, -1, -1, -1]
    assert item["image"][1:].abs().sum() == 0 and item["image"][0].mean() > 0.4  # padding is zeros


def test_one_random_augmentation_for_all_frames_of_a_clip(tmp_path):
    """Every frame of a clip gets the same crop: a random shift applied per frame would differ."""
    frames = [Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))) for _ in range(4)]
    record = ImageCaptionRecord("v", _Frames(frames), ["c"], "train")

    def random_crop(image: Image.Image) -> torch.Tensor:
        left = random.randint(0, 8) + int(torch.randint(0, 1, (1,)))
        return torch.from_numpy(np.asarray(image.convert("RGB").crop((left, 0, left + 8, 8)), np.float32))

    for seed in range(5):
        torch.manual_seed(seed)
        item = ItemLoader(random_crop, FrameSampler(4))(record, np.random.default_rng(seed))
        assert all(torch.equal(item["image"][0], item["image"][t]) for t in range(4))


class _Frames:
    def __init__(self, frames: list[Image.Image]) -> None:
        self.frames = frames

    def num_frames(self) -> int:
        return len(self.frames)

    def read_frames(self, indices):
        return [self.frames[i] for i in indices]

    def describe(self) -> str:
        return "in-memory frames"


# ------------------------------------------------------------------------------------------------ MSR-VTT


def write_msrvtt(root: Path, videos: dict[str, str], sentences: list[tuple[str, str]]) -> Path:
    data = {
        "info": {"year": 2016},
        "videos": [
            {"video_id": vid, "split": split, "id": i} for i, (vid, split) in enumerate(videos.items())
        ],
        "sentences": [
            {"video_id": vid, "caption": text, "sen_id": i} for i, (vid, text) in enumerate(sentences)
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(data))
    return root / "annotations.json"


def msrvtt_pack(root: Path) -> Path:
    """Four videos: two frame folders, one clip file, one single-frame folder; 2-3 captions each."""
    write_frames(root / "frames" / "video0", [0, 30, 60, 90, 120, 150])
    write_frames(root / "frames" / "video1", [0, 40, 80, 120])
    write_clip(root / "videos" / "video2.mp4", num_frames=10)
    write_frames(root / "frames" / "video3", [5])
    return write_msrvtt(
        root,
        {"video0": "train", "video1": "train", "video2": "validate", "video3": "test"},
        [
            ("video0", "a man is cooking"),
            ("video0", "someone cooks food"),
            ("video1", "a cat plays"),
            ("video1", "a kitten is playing"),
            ("video2", "cars race on a track"),
            ("video2", "a car race"),
            ("video2", "racing"),
            ("video3", "a single frame"),
        ],
    )


def test_msrvtt_videodatainfo_frames_and_files(tmp_path):
    path = msrvtt_pack(tmp_path)
    records = read_source(MSRVTT(str(path)))
    assert [(r.image_id, r.split, len(r.captions)) for r in records] == [
        ("video0", "train", 2),
        ("video1", "train", 2),
        ("video2", "val", 3),  # MSR-VTT's "validate" is the data module's default "val"
        ("video3", "test", 1),
    ]
    assert isinstance(records[0].image, FrameFolderVideo) and records[0].image.num_frames() == 6
    assert isinstance(records[2].image, VideoFileVideo) and records[2].image.num_frames() == 10
    assert records[0].is_video


def test_msrvtt_unknown_video_id_and_missing_media(tmp_path):
    path = msrvtt_pack(tmp_path)
    data = json.loads(path.read_text())
    data["sentences"].append({"video_id": "video99", "caption": "orphan", "sen_id": 99})
    data["videos"].append({"video_id": "video4", "split": "train", "id": 4})  # no frames, no file
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"sentences\[8\]: caption for unknown video id 'video99'"):
        read_source(MSRVTT(str(path)))
    report = SkipReport()
    records = read_source(MSRVTT(str(path)), on_error="skip", report=report)
    assert report.counts == {"unknown_video_id": 1, "missing_video": 1}
    assert [r.image_id for r in records] == ["video0", "video1", "video2", "video3"]
    assert "video id 'video4'): no frame folder or video file under" in report.examples["missing_video"][0]


def test_clip4clip_split_files(tmp_path):
    path = msrvtt_pack(tmp_path)
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\n")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr2,video2,a car race\nret1,msr3,video3,one frame only\n"
    )
    train = read_source(MSRVTT(str(path), split_file=str(tmp_path / "MSRVTT_train.9k.csv")), split="train")
    assert [(r.image_id, r.split, r.captions) for r in train] == [
        ("video0", "train", ["a man is cooking", "someone cooks food"]),
        ("video1", "train", ["a cat plays", "a kitten is playing"]),
    ]
    test = read_source(MSRVTT(str(path), split_file=str(tmp_path / "MSRVTT_JSFUSION_test.csv")), split="test")
    assert [(r.image_id, r.split) for r in test] == [("video2", "test"), ("video3", "test")]
    assert test[0].captions[test[0].eval_caption] == "a car race" and len(test[0].captions) == 3
    assert test[1].captions[test[1].eval_caption] == "one frame only"  # not in the JSON: added
    # Without the annotation JSON the test list alone gives one caption per video.
    alone = read_source(MSRVTT(split_file=str(tmp_path / "MSRVTT_JSFUSION_test.csv")), split="test")
    assert [r.captions for r in alone] == [["a car race"], ["one frame only"]]
    with pytest.raises(DataFormatError, match=r"annotations= .* must give the captions"):
        read_source(MSRVTT(split_file=str(tmp_path / "MSRVTT_train.9k.csv")))
    (tmp_path / "bad.csv").write_text("vid\nvideo0\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv: no 'video_id' column"):
        read_source(MSRVTT(str(path), split_file=str(tmp_path / "bad.csv")))


def video_module(path: Path, **options) -> ImageTextDataModule:
    dm = ImageTextDataModule(source=MSRVTT(str(path)), batch_size=2, num_frames=4, **options)
    dm.attach_preprocessing(Preprocessing(to_tensor_8px, to_tensor_8px, WhitespaceTokenizer()))
    return dm


def test_video_batches_train_and_eval(tmp_path):
    dm = video_module(msrvtt_pack(tmp_path), val_split=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 4, 3, 8, 8)
    assert batch["frame_mask"].dtype == torch.bool and batch["frame_mask"].all()
    assert batch["frame_indices"].dtype == torch.long and batch["frame_indices"].shape == (2, 4)
    dm.setup("test")
    (test,) = list(dm.test_dataloader())
    assert test["pixel_values"].shape == (1, 4, 3, 8, 8)
    assert test["frame_mask"].tolist() == [[True, False, False, False]]  # the one-frame video, padded
    assert test["frame_indices"].tolist() == [[0, -1, -1, -1]]
    assert set(test) >= {"caption_ids", "caption_image_ids", "input_ids"}


def test_evaluation_frames_are_deterministic_and_training_frames_vary(tmp_path):
    dm = video_module(msrvtt_pack(tmp_path), max_eval_images=None)
    dm.setup("fit")
    first = [b["frame_indices"] for b in dm.val_dataloader()]
    again = [b["frame_indices"] for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[0].tolist() == [[1, 3, 6, 8]]  # segment centres of the 10-frame clip
    dataset = dm.train_dataloader().dataset
    draws = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        draws.add(tuple(dataset[0]["frame_indices"].tolist()))
    assert len(draws) > 1


def test_eval_caption_protocol_one(tmp_path):
    path = msrvtt_pack(tmp_path)
    (tmp_path / "test.csv").write_text(
        "key,vid_key,video_id,sentence\nr0,m2,video2,racing\nr1,m0,video0,x y\n"
    )
    options = {"test_source": MSRVTT(str(path), split_file=str(tmp_path / "test.csv")), "val_split": None}
    one = video_module(path, eval_captions="one", **options)
    one.setup("test")
    assert one.eval_captions == "one"
    assert one.evaluation_texts("test") == ["racing", "x y"]
    (batch,) = list(one.test_dataloader())
    assert batch["caption_image_ids"].tolist() == [0, 1] and batch["input_ids"].shape[0] == 2
    every = video_module(path, eval_captions="all", **options)
    every.setup("test")
    assert len(every.evaluation_texts("test")) == 3 + 3  # video2: 3 sentences; video0: 2 + the split's


def test_corrupt_video_skipped_when_validated(tmp_path):
    path = msrvtt_pack(tmp_path)
    (tmp_path / "videos" / "video2.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(VideoLoadError, match=r"video2\.mp4"):
        video_module(path, validate_images=True).setup("fit")
    dm = video_module(path, validate_images=True, on_error="skip")
    with pytest.raises(DataFormatError, match="no image of split 'val' could be loaded"):
        dm.setup("fit")  # video2 is the only validation video
    assert dm.skip_report.counts == {"unreadable_video": 1}
    assert "video2.mp4" in dm.skip_report.examples["unreadable_video"][0]


# ------------------------------------------------------------------------------------------------ tables, shards


def test_video_table_jsonl_with_files_and_folders(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", num_frames=6)
    write_frames(tmp_path / "frames" / "b", [0, 1, 2])
    rows = [
        {"video": "clips/a.mp4", "caption": ["a clip", "another caption"]},
        {"video": "frames/b", "caption": "some frames"},
        {"video": "clips/missing.mp4", "caption": "gone"},
    ]
    (tmp_path / "videos.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(DataFormatError, match=r"videos\.jsonl, line 3 .*not found: .*missing\.mp4"):
        read_source(VideoTable(str(tmp_path / "videos.jsonl")))
    report = SkipReport()
    records = read_source(VideoTable(str(tmp_path / "videos.jsonl")), on_error="skip", report=report)
    assert report.counts == {"missing_video": 1}
    assert [(r.image_id, type(r.image).__name__) for r in records] == [
        ("clips/a.mp4", "VideoFileVideo"),
        ("frames/b", "FrameFolderVideo"),
    ]
    (tmp_path / "videos.csv").write_text("video,title\nclips/a.mp4,a clip\nframes/b,frames\n")
    assert len(read_source(VideoTable(str(tmp_path / "videos.csv")))) == 2


def test_webdataset_video_samples_frames_and_clips(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", num_frames=8).read_bytes()
    frames = [(f"v1.{i:03d}.jpg", _jpeg(grey(40 * i))) for i in range(3)]
    write_tar(
        tmp_path / "videos.tar",
        [*frames, ("v1.txt", b"three frames"), ("v2.mp4", clip), ("v2.json", b'{"captions": ["a clip"]}')],
    )
    records = read_source(WebDataset(str(tmp_path / "videos.tar")), split="test")
    assert [(r.image_id, r.image.num_frames()) for r in records] == [("v1", 3), ("v2", 8)]
    assert [round(level(f) / 40) for f in records[0].image.read_frames([0, 1, 2])] == [0, 1, 2]
    stream = WebDataset(str(tmp_path / "videos.tar")).training_stream(
        split="train",
        captions_per_image="all",
        load_item=ItemLoader(to_tensor_8px, FrameSampler(4)),
        drop_last=False,
        report=SkipReport(),
    )
    items = list(stream)
    assert len(items) == len(stream) == 2
    assert {tuple(item["frame_mask"].tolist()) for item in items} == {
        (True, True, True, False),
        (True, True, True, True),
    }


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "JPEG")
    return buffer.getvalue()
