from __future__ import annotations

import logging

import pytest

from pefttune.data.records import (
    DataFormatError,
    ErrorPolicy,
    ImageCaptionRecord,
    SkipReport,
    normalize_caption,
    select_split,
    validate_records,
)


def record(
    image_id: str, captions: list, split: str = "train", origin: str | None = None
) -> ImageCaptionRecord:
    return ImageCaptionRecord(image_id=image_id, image=b"x", captions=captions, split=split, origin=origin)


def test_valid_records_pass_with_captions_stripped():
    records = [record("a", ["  a dog  ", "a cat"]), record("b", ["a bird"])]
    valid = validate_records(records, source="file.json")
    assert [r.image_id for r in valid] == ["a", "b"]
    assert valid[0].captions == ["a dog", "a cat"]
    assert records[0].captions == ["  a dog  ", "a cat"]  # input records are not modified


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_or_whitespace_caption_raises_naming_file_and_record(bad):
    records = [record("a", ["fine"]), record("b", ["ok", bad], origin="ann.json, images[1]")]
    with pytest.raises(DataFormatError, match=r"ann\.json, images\[1\] \(image id 'b'\): caption 1 is empty"):
        validate_records(records, source="ann.json")


def test_empty_caption_skipped_counted_and_listed(caplog):
    report = SkipReport()
    records = [record("a", ["fine", " "]), record("b", [""])]
    valid = validate_records(records, source="ann.json", on_error="skip", report=report)
    assert [(r.image_id, r.captions) for r in valid] == [("a", ["fine"])]
    assert report.counts == {"empty_caption": 2, "no_captions": 1}
    assert report.total == 3
    assert any("image id 'b'" in message for message in report.examples["no_captions"])
    with caplog.at_level(logging.WARNING):
        report.log(context="test")
    assert "empty_caption" in caplog.text and "no_captions" in caplog.text


def test_non_string_caption_is_reported():
    with pytest.raises(DataFormatError, match="caption 0 must be a string"):
        validate_records([record("a", [3])], source="s")


def test_duplicate_image_ids_raise_and_skip_keeps_first():
    records = [record("a", ["one"], origin="f, row 1"), record("a", ["two"], origin="f, row 2")]
    with pytest.raises(
        DataFormatError, match=r"f, row 2 \(image id 'a'\): duplicate image id 'a', already used by f, row 1"
    ):
        validate_records(records, source="f")
    report = SkipReport()
    valid = validate_records(records, source="f", on_error="skip", report=report)
    assert [r.captions for r in valid] == [["one"]]
    assert report.counts == {"duplicate_image_id": 1}


def test_missing_image_file_detected(tmp_path):
    missing = ImageCaptionRecord("a", str(tmp_path / "nope.jpg"), ["cap"], "train", origin="ann.csv, row 1")
    with pytest.raises(
        DataFormatError, match=r"ann\.csv, row 1 \(image id 'a'\): image file not found: .*nope\.jpg"
    ):
        validate_records([missing], source="ann.csv")
    assert validate_records([missing], source="ann.csv", check_files=False) == [missing]


def test_select_split_names_split_and_available_splits():
    records = [record("a", ["x"], "train"), record("b", ["y"], "train"), record("c", ["z"], "test")]
    assert [r.image_id for r in select_split(records, "test", source="f")] == ["c"]
    with pytest.raises(
        DataFormatError,
        match=r"f: split 'val' has no images; available splits: 'test' \(1 images\), 'train' \(2 images\)",
    ):
        select_split(records, "val", source="f")


def test_skip_report_merge_and_summary_limits_examples():
    first = SkipReport(max_examples=2)
    for i in range(3):
        first.add("empty_caption", f"message {i}")
    second = SkipReport()
    second.add("missing_key", "other")
    first.merge(second)
    assert first.counts == {"empty_caption": 3, "missing_key": 1}
    assert first.examples["empty_caption"] == ["message 0", "message 1"]
    assert "... and 1 more" in first.summary()
    assert SkipReport().summary() == "nothing skipped"


def test_error_policy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="on_error"):
        ErrorPolicy("ignore")  # type: ignore[arg-type]


def test_normalize_caption():
    assert normalize_caption("  A  Red\tCircle\n") == "a red circle"


def test_same_file_under_two_ids_warned_in_training_refused_in_evaluation(tmp_path, caplog):
    """Issue 16.6: the same image file under two ids in one split was accepted silently."""
    import logging

    from data_fixtures import write_image

    from pefttune.data import ImageTextDataModule
    from pefttune.data.sources import Table

    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    rows = ["filepath\ttitle\tid\tsplit"]
    for split in ("train", "val"):
        rows += [f"a.jpg\tfirst\t{split}1\t{split}", f"b.jpg\tsecond\t{split}2\t{split}"]
        rows += [f"a.jpg\tthe same file again\t{split}3\t{split}"]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    source = Table(str(tmp_path / "pairs.tsv"), group_column="id", split_column="split")
    with caplog.at_level(logging.WARNING):
        dm = ImageTextDataModule(source=source, val_split=None, test_split=None, batch_size=2)
        dm.setup("fit")
    assert len(dm.records("train")) == 3  # kept, with a warning that names the count and the file
    assert "1 record(s) of split 'train' reuse a file already listed under another id" in caplog.text
    dm = ImageTextDataModule(source=source, test_split=None, batch_size=2)
    with pytest.raises(DataFormatError, match=r"1 record\(s\) of split 'val' reuse a file .*/a\.jpg"):
        dm.setup("fit")
    dm = ImageTextDataModule(source=source, test_split=None, batch_size=2, on_error="skip")
    dm.setup("fit")
    assert [r.image_id for r in dm.records("val")] == ["val1", "val2"]
    assert dm.skip_report.counts == {"duplicate_image_file": 1}
