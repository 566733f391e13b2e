from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import (
    jpeg_bytes,
    karpathy_entry,
    read_coco_json,
    read_csv,
    read_json_list,
    read_jsonl,
    read_karpathy_json,
    read_records,
    read_webdataset,
    write_image,
    write_karpathy,
    write_shards,
    write_tar,
)

from pefttune.data.datasets import load_image
from pefttune.data.legacy import detect_format
from pefttune.data.records import DataFormatError, SkipReport, select_split
from pefttune.data.sources.webdataset import TarMember, expand_shards

# ------------------------------------------------------------------------------------------------ Karpathy


def test_karpathy_reader_ids_paths_splits_labels(tmp_path):
    images = [
        karpathy_entry("a.jpg", "train", ["a dog", "a brown dog"], filepath="train2014", cocoid=11, imgid=0),
        karpathy_entry(
            "b.jpg", "restval", ["a cat"], filepath="val2014", cocoid=12, imgid=1, **{"class": "cat"}
        ),
        karpathy_entry("c.jpg", "test", ["a bird"], imgid=2),
        karpathy_entry("d.jpg", "val", ["a fish"]),
    ]
    path = write_karpathy(tmp_path / "dataset_coco.json", images, image_dir=tmp_path / "images")
    records = read_karpathy_json(str(path), image_root=str(tmp_path / "images"))
    assert [r.image_id for r in records] == ["11", "12", "2", "d.jpg"]  # cocoid, else imgid, else path
    assert [r.split for r in records] == ["train", "train", "test", "val"]  # restval -> train
    assert records[0].captions == ["a dog", "a brown dog"]
    assert records[0].image == str(tmp_path / "images" / "train2014" / "a.jpg")
    assert [r.label for r in records] == [None, "cat", None, None]
    kept = read_karpathy_json(str(path), image_root=str(tmp_path / "images"), restval_split=None)
    assert kept[1].split == "restval"


def test_karpathy_relative_paths_default_to_the_annotation_folder(tmp_path):
    path = write_karpathy(
        tmp_path / "ann.json", [karpathy_entry("x.jpg", "train", ["cap"])], image_dir=tmp_path
    )
    assert read_karpathy_json(str(path))[0].image == str(tmp_path / "x.jpg")


def test_karpathy_missing_key_names_file_record_and_key(tmp_path):
    images = [karpathy_entry("a.jpg", "train", ["ok"]), {"filename": "b.jpg", "sentences": [{"raw": "x"}]}]
    path = write_karpathy(tmp_path / "ann.json", images, image_dir=tmp_path)
    with pytest.raises(
        DataFormatError, match=r"ann\.json, images\[1\] \(image id 'b\.jpg'\): missing key 'split'"
    ):
        read_karpathy_json(str(path))
    report = SkipReport()
    records = read_karpathy_json(str(path), on_error="skip", report=report)
    assert [r.image_id for r in records] == ["a.jpg"]
    assert report.counts == {"missing_key": 1}
    assert "skipped 1 item(s)" in report.summary() and "missing key 'split'" in report.summary()


def test_karpathy_sentence_without_raw(tmp_path):
    entry = {"filename": "a.jpg", "split": "train", "sentences": [{"tokens": ["a"]}, {"raw": "a dog"}]}
    path = write_karpathy(tmp_path / "ann.json", [entry], image_dir=tmp_path)
    with pytest.raises(DataFormatError, match=r"images\[0\] .*sentences\[0\] has no key 'raw'"):
        read_karpathy_json(str(path))
    report = SkipReport()
    assert read_karpathy_json(str(path), on_error="skip", report=report)[0].captions == ["a dog"]
    assert report.counts == {"bad_caption": 1}


def test_karpathy_empty_caption_and_duplicate_ids(tmp_path):
    images = [
        karpathy_entry("a.jpg", "train", ["ok", "  "], cocoid=1),
        karpathy_entry("b.jpg", "train", ["fine"], cocoid=1),
    ]
    path = write_karpathy(tmp_path / "ann.json", images, image_dir=tmp_path)
    with pytest.raises(DataFormatError, match=r"images\[0\] \(image id '1'\): caption 1 is empty"):
        read_karpathy_json(str(path))
    report = SkipReport()
    records = read_karpathy_json(str(path), on_error="skip", report=report)
    assert [(r.image_id, r.captions) for r in records] == [("1", ["ok"])]
    assert report.counts == {"empty_caption": 1, "duplicate_image_id": 1}
    assert "images[1]" in report.examples["duplicate_image_id"][0]


def test_karpathy_wrong_top_level(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataFormatError, match="expected a JSON object with an 'images' list"):
        read_karpathy_json(str(path))


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{\n  "images": [\n    {"filename": "a.jpg",, "split": "train"}\n  ]\n}')
    with pytest.raises(DataFormatError, match=r"ann\.json: malformed JSON at line 3, column 26"):
        read_karpathy_json(str(path))


def test_non_utf8_annotation_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "captions.csv"
    data = b"filepath,title\na.jpg,caf\xe9 au lait\n"  # Latin-1, as spreadsheets often export
    path.write_bytes(data)
    write_image(tmp_path / "a.jpg")
    offset = data.index(b"\xe9")
    with pytest.raises(
        DataFormatError, match=rf"captions\.csv: not valid UTF-8 at byte offset {offset} \(line 2"
    ):
        read_csv(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "ann.csv"
    path.write_bytes("\ufefffilepath,title\na.jpg,café\n".encode())
    assert read_csv(str(path))[0].captions == ["café"]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataFormatError, match="annotation file not found"):
        read_karpathy_json(str(tmp_path / "none.json"))


# ------------------------------------------------------------------------------------------------ COCO


def coco(images, annotations) -> str:
    return json.dumps({"images": images, "annotations": annotations})


def test_coco_reader_groups_annotations_per_image(tmp_path):
    for name in ("1.jpg", "2.jpg"):
        write_image(tmp_path / "imgs" / name)
    path = tmp_path / "captions_val2014.json"
    path.write_text(
        coco(
            [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
            [
                {"id": 10, "image_id": 2, "caption": "two a"},
                {"id": 11, "image_id": 1, "caption": "one a"},
                {"id": 12, "image_id": 2, "caption": "two b"},
            ],
        )
    )
    records = read_coco_json(str(path), split="val", image_root=str(tmp_path / "imgs"))
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("1", ["one a"], "val"),
        ("2", ["two a", "two b"], "val"),
    ]
    assert detect_format(str(path)) == "coco"


def test_coco_bad_input(tmp_path):
    write_image(tmp_path / "1.jpg")
    path = tmp_path / "c.json"
    path.write_text(
        coco(
            [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "1.jpg"}, {"file_name": "3.jpg"}],
            [{"image_id": 1, "caption": "ok"}, {"image_id": 7, "caption": "orphan"}, {"image_id": 1}],
        )
    )
    with pytest.raises(DataFormatError, match=r"c\.json, images\[1\]: duplicate image id '1'"):
        read_coco_json(str(path))
    report = SkipReport()
    records = read_coco_json(str(path), on_error="skip", report=report)
    assert [(r.image_id, r.captions) for r in records] == [("1", ["ok"])]
    assert report.counts == {
        "duplicate_image_id": 1,
        "missing_key": 1,
        "unknown_image_id": 1,
        "bad_caption": 1,
    }
    assert "images[2]: missing key 'id'" in report.examples["missing_key"][0]
    assert "annotations[2]: missing key 'caption'" in report.examples["bad_caption"][0]


def test_coco_missing_lists(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataFormatError, match="missing list 'annotations'"):
        read_coco_json(str(path))


def test_coco_image_without_captions(tmp_path):
    write_image(tmp_path / "1.jpg")
    path = tmp_path / "c.json"
    path.write_text(coco([{"id": 5, "file_name": "1.jpg"}], []))
    with pytest.raises(DataFormatError, match=r"images\[0\] \(image id '5'\): no usable caption"):
        read_coco_json(str(path))


# ------------------------------------------------------------------------------------------------ CSV


def write_rows(path: Path, rows: list[list[str]], sep: str) -> Path:
    path.write_text("\n".join(sep.join(row) for row in rows) + "\n")
    return path


def test_csv_groups_rows_per_image_and_reads_optional_columns(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    rows = [
        ["filepath", "title", "split", "label"],
        ["a.jpg", "a dog", "train", "dog"],
        ["b.jpg", "a cat", "test", "cat"],
        ["a.jpg", "a brown dog", "train", "dog"],
    ]
    records = read_csv(
        str(write_rows(tmp_path / "d.tsv", rows, "\t")), split_column="split", label_column="label"
    )
    assert [(r.image_id, r.captions, r.split, r.label) for r in records] == [
        ("a.jpg", ["a dog", "a brown dog"], "train", "dog"),
        ("b.jpg", ["a cat"], "test", "cat"),
    ]
    assert records[0].origin.endswith("row 1 (line 2)")


def test_csv_group_column_and_custom_columns(tmp_path):
    write_image(tmp_path / "x" / "a.jpg")
    rows = [["id", "img", "text"], ["7", "x/a.jpg", "first"], ["7", "x/a.jpg", "second"]]
    path = write_rows(tmp_path / "d.csv", rows, ",")
    records = read_csv(str(path), image_column="img", caption_column="text", group_column="id", split="val")
    assert [(r.image_id, r.captions, r.split) for r in records] == [("7", ["first", "second"], "val")]


def test_csv_quoted_captions_with_separator_inside(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "d.csv"
    path.write_text('filepath,title\na.jpg,"a dog, running"\n')
    assert read_csv(str(path))[0].captions == ["a dog, running"]


def test_csv_separator_mistake_is_explained(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = write_rows(tmp_path / "d.csv", [["filepath", "title"], ["a.jpg", "a dog"]], ",")
    with pytest.raises(
        DataFormatError, match=r"column 'filepath' not found .*contains commas.*pass separator=','"
    ):
        read_csv(str(path), separator="\t")
    tsv = write_rows(tmp_path / "d2.csv", [["filepath", "title"], ["a.jpg", "a dog"]], "\t")
    with pytest.raises(DataFormatError, match=r"contains tabs.*pass separator='\\t'"):
        read_csv(str(tsv), separator=",")
    # Without an explicit separator the reader falls back to the one that yields the columns.
    assert read_csv(str(tsv))[0].captions == ["a dog"]


def test_csv_missing_column_without_hint(tmp_path):
    path = write_rows(tmp_path / "d.csv", [["path", "title"], ["a.jpg", "x"]], ",")
    with pytest.raises(
        DataFormatError, match=r"column 'filepath' not found in the header \(columns: \['path', 'title'\]\)$"
    ):
        read_csv(str(path))


def test_csv_bad_rows(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    rows = [["filepath", "title"], ["a.jpg", "ok"], ["b.jpg"], ["b.jpg", "  "], ["a.jpg", "more"]]
    path = write_rows(tmp_path / "d.csv", rows, ",")
    with pytest.raises(DataFormatError, match=r"d\.csv, row 2 \(line 3\): 1 fields, expected 2"):
        read_csv(str(path))
    report = SkipReport()
    records = read_csv(str(path), on_error="skip", report=report)
    assert [(r.image_id, r.captions) for r in records] == [("a.jpg", ["ok", "more"])]
    # b.jpg: one short row, one whitespace caption, so no caption left.
    assert report.counts == {"missing_key": 1, "empty_caption": 1, "no_captions": 1}


def test_csv_malformed_quoting_names_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('filepath,title\na.jpg,"a dog\n')  # the quote is never closed
    with pytest.raises(DataFormatError, match=r"d\.csv, line 2: malformed CSV: unexpected end of data"):
        read_csv(str(path))
    path.write_text('filepath,title\na.jpg,ok\nb.jpg,"a dog" running\n')
    with pytest.raises(DataFormatError, match=r"d\.csv, line 3: malformed CSV: ',' expected after '\"'"):
        read_csv(str(path))


def test_csv_same_group_id_with_different_images_is_a_duplicate(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    rows = [["id", "filepath", "title"], ["1", "a.jpg", "x"], ["1", "b.jpg", "y"]]
    path = write_rows(tmp_path / "d.csv", rows, ",")
    with pytest.raises(
        DataFormatError, match=r"row 2 \(line 3\): duplicate image id '1' with a different image"
    ):
        read_csv(str(path), group_column="id")


def test_csv_conflicting_split_for_same_image(tmp_path):
    write_image(tmp_path / "a.jpg")
    rows = [["filepath", "title", "split"], ["a.jpg", "x", "train"], ["a.jpg", "y", "test"]]
    path = write_rows(tmp_path / "d.csv", rows, ",")
    with pytest.raises(DataFormatError, match=r"has split 'test' .* gave split 'train'"):
        read_csv(str(path), split_column="split")


# ------------------------------------------------------------------------------------------ JSON lines / list


def test_jsonl_caption_string_or_list_and_grouping(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    lines = [
        {"image": "a.jpg", "caption": "a dog", "image_id": 1},
        {"image": "b.jpg", "caption": ["a cat", "the cat"], "image_id": 2, "class": "cat"},
        {"image": "a.jpg", "caption": "the dog", "image_id": 1},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = read_jsonl(str(path), id_key="image_id", label_key="class")
    assert [(r.image_id, r.captions, r.label) for r in records] == [
        ("1", ["a dog", "the dog"], None),
        ("2", ["a cat", "the cat"], "cat"),
    ]
    assert detect_format(str(path)) == "jsonl"


def test_jsonl_malformed_line_gives_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg" "caption": "y"}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: malformed JSON at line 1, column 19"):
        read_jsonl(str(path))


def test_jsonl_missing_key(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "text": "y"}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: missing key 'caption'"):
        read_jsonl(str(path))
    report = SkipReport()
    assert read_jsonl(str(path), on_error="skip", report=report)[0].captions == ["x"]
    assert report.counts == {"missing_key": 1}


def test_json_list_lavis_layout(tmp_path):
    write_image(tmp_path / "val2014" / "a.jpg")
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps([{"image": "val2014/a.jpg", "caption": ["one", "two"]}]))
    assert detect_format(str(path)) == "json_list"
    records = read_json_list(str(path), split="test")
    assert [(r.image_id, r.captions, r.split) for r in records] == [("val2014/a.jpg", ["one", "two"], "test")]


# ------------------------------------------------------------------------------------------------ WebDataset


def test_expand_shards():
    assert expand_shards("d/s-{000..002}.tar") == ["d/s-000.tar", "d/s-001.tar", "d/s-002.tar"]
    assert expand_shards("{a,b}-{1..2}.tar::x.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar", "x.tar"]
    assert expand_shards("{a,b{0..1}}.tar") == ["a.tar", "b0.tar", "b1.tar"]
    assert expand_shards("plain.tar") == ["plain.tar"]
    with pytest.raises(DataFormatError, match="shard pattern"):
        expand_shards("s-{0..3.tar")


def test_webdataset_two_shards_read_with_json_and_txt(tmp_path):
    keys = write_shards(tmp_path, num_shards=2, per_shard=3, captions=2)
    pattern = str(tmp_path / "shard-{000..001}.tar")
    assert detect_format(pattern) == "webdataset"
    records = read_webdataset(pattern, split="val")
    assert [r.image_id for r in records] == keys
    assert records[0].captions == ["caption 0 of s0-0", "caption 1 of s0-0"]
    assert records[0].label == "class0" and records[0].split == "val"
    assert isinstance(records[0].image, TarMember)  # local uncompressed shards are read lazily
    assert load_image(records[4].image).getpixel((4, 4))[1] == pytest.approx(50, abs=8)

    txt_only = write_tar(tmp_path / "txt.tar", [("k1.png", jpeg_bytes()), ("k1.txt", b"a caption from txt")])
    assert read_records(str(txt_only))[0].captions == ["a caption from txt"]


def test_webdataset_bad_samples(tmp_path):
    shard = write_tar(
        tmp_path / "bad.tar",
        [
            ("ok.jpg", jpeg_bytes()),
            ("ok.txt", b"fine"),
            ("noimage.txt", b"no image here"),
            ("nocap.jpg", jpeg_bytes()),
            ("badjson.jpg", jpeg_bytes()),
            ("badjson.json", b'{"captions": ["x",]}'),
        ],
    )
    with pytest.raises(DataFormatError, match=r"bad\.tar, sample 'noimage': no image"):
        read_webdataset(str(shard))
    report = SkipReport()
    records = read_webdataset(str(shard), on_error="skip", report=report)
    assert [r.image_id for r in records] == ["ok"]
    assert report.counts == {"bad_sample": 2, "no_captions": 1}
    assert any("malformed JSON at line 1, column 19" in m for m in report.examples["bad_sample"])


def test_webdataset_missing_and_corrupt_shards(tmp_path):
    with pytest.raises(DataFormatError, match=r"2 of 2 shard\(s\) not found"):
        read_webdataset(str(tmp_path / "none-{0..1}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataFormatError, match=r"junk\.tar: not a readable tar shard"):
        read_webdataset(str(tmp_path / "junk.tar"))


# ------------------------------------------------------------------------------------------------ dispatch


def test_read_records_auto_detection_and_split_selection(tmp_path):
    images = [karpathy_entry("a.jpg", "train", ["x"]), karpathy_entry("b.jpg", "test", ["y"])]
    path = write_karpathy(tmp_path / "dataset_flickr30k.json", images, image_dir=tmp_path)
    assert detect_format(str(path)) == "karpathy"
    records = read_records(str(path))
    assert [r.image_id for r in select_split(records, "test", source=str(path))] == ["b.jpg"]
    with pytest.raises(
        DataFormatError, match=r"split 'val' has no images; available splits: 'test' \(1 images\), 'train'"
    ):
        select_split(records, "val", source=str(path))


def test_detect_format_errors(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        detect_format(str(tmp_path / "data.parquet"))
    odd = tmp_path / "odd.json"
    odd.write_text('{"something": 1}')
    with pytest.raises(DataFormatError, match="cannot tell the JSON layout"):
        detect_format(str(odd))
    with pytest.raises(DataFormatError, match="unknown format"):
        read_records(str(odd), format="parquet")  # type: ignore[arg-type]
