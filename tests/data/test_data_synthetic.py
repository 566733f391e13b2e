from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from pefttune.data.records import DataFormatError
from pefttune.data.sources.synthetic import COLOURS, HELD_OUT_PAIRS, SHAPES
from pefttune.data.sources.synthetic import Synthetic as SyntheticScenes


def snapshot(dataset: SyntheticScenes, split: str) -> list[tuple[bytes, list[str], str | None]]:
    return [(np.asarray(r.image()).tobytes(), r.captions, r.label) for r in dataset.split_records(split)]


def test_same_seed_same_pixels_and_captions():
    first = SyntheticScenes(num_train=20, num_val=4, num_test=8, seed=3)
    second = SyntheticScenes(num_train=20, num_val=4, num_test=8, seed=3)
    for split in ("train", "val", "test"):
        assert snapshot(first, split) == snapshot(second, split)
    other = SyntheticScenes(num_train=20, num_val=4, num_test=8, seed=4)
    assert snapshot(other, "train") != snapshot(first, "train")


def test_split_sizes_do_not_change_other_splits():
    small = SyntheticScenes(num_train=5, num_val=3, num_test=3, seed=0)
    large = SyntheticScenes(num_train=9, num_val=30, num_test=3, seed=0)
    assert snapshot(small, "train") == snapshot(large, "train")[:5]


def test_images_are_rgb_of_the_requested_size_and_records_pickle():
    dataset = SyntheticScenes(num_train=4, num_val=1, num_test=1, image_size=96)
    image = dataset.split_records("train")[0].image()
    assert image.mode == "RGB" and image.size == (96, 96)
    restored = pickle.loads(
        pickle.dumps(dataset.split_records("train"))
    )  # DataLoader workers may pickle them
    assert np.array_equal(np.asarray(restored[0].image()), np.asarray(image))


def test_objects_are_drawn():
    dataset = SyntheticScenes(num_train=30, num_val=1, num_test=1)
    for index, record in enumerate(dataset.split_records("train")):
        array = np.asarray(record.image()).astype(int)
        main = dataset.scene("train", index).objects[0]
        colour = np.array(COLOURS[main.colour])
        assert (np.abs(array - colour).sum(axis=2) < 10).sum() >= 9, record.captions[0]


def test_five_distinct_captions_mentioning_the_main_object():
    dataset = SyntheticScenes(num_train=50, num_val=1, num_test=1)
    synonyms = {"purple": ("purple", "violet")}
    for index, record in enumerate(dataset.split_records("train")):
        assert len(record.captions) == 5 and len(set(record.captions)) == 5
        main = dataset.scene("train", index).objects[0]
        for caption in record.captions:
            assert any(word in caption for word in synonyms.get(main.colour, (main.colour,)))


def test_labels_and_class_names():
    dataset = SyntheticScenes(num_train=40, num_val=8, num_test=40)
    assert len(dataset.class_names()) == len(COLOURS) * len(SHAPES) == 42
    assert set(dataset.held_out_classes) == {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    for split in ("train", "val", "test"):
        for record in dataset.split_records(split):
            assert record.label in dataset.class_names()
            assert (
                record.label == dataset.scene(split, int(record.image_id.rsplit("-", 1)[1])).objects[0].label
            )


def test_held_out_combinations_absent_from_train_and_val_present_in_test():
    dataset = SyntheticScenes(num_train=600, num_val=100, num_test=200)
    for split in ("train", "val"):
        for index in range(dataset.sizes[split]):
            for obj in dataset.scene(split, index).objects:
                assert (obj.colour, obj.shape) not in HELD_OUT_PAIRS
    test_labels = [record.label for record in dataset.split_records("test")]
    held_out = [label for label in test_labels if dataset.is_held_out(label)]
    assert 0.3 < len(held_out) / len(test_labels) < 0.7
    assert len(set(held_out)) == len(HELD_OUT_PAIRS)
    # Every colour and every shape is still seen in training.
    train_objects = {(o.colour, o.shape) for i in range(600) for o in dataset.scene("train", i).objects}
    assert {c for c, _ in train_objects} == set(COLOURS) and {s for _, s in train_objects} == set(SHAPES)


def test_generating_two_thousand_images_is_fast():
    start = time.perf_counter()
    dataset = SyntheticScenes(num_train=2000, num_val=0, num_test=0, image_size=64)
    images = [record.image() for record in dataset.split_records("train")]
    assert len(images) == 2000
    assert time.perf_counter() - start < 5.0  # about 0.5 s on an idle 2-core machine


def test_unknown_or_empty_split():
    dataset = SyntheticScenes(num_train=2, num_val=0, num_test=2)
    with pytest.raises(
        DataFormatError, match=r"split 'val' has no images; available splits: 'train' \(2 images\)"
    ):
        dataset.split_records("val")
    with pytest.raises(DataFormatError, match="split 'dev'"):
        dataset.split_records("dev")
