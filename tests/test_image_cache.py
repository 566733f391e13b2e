"""The decoded-image cache gives the transform's exact output without decoding again."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from pefttune.data import ImageTextDataModule, Synthetic, Table
from pefttune.data.cache import CachedImageSource, DecodedImageCache, image_identity, split_transform
from pefttune.data.datasets import ImageWithCaptionsDataset, load_image
from pefttune.data.records import ImageCaptionRecord
from pefttune.testing import tiny_vit


def write_images(folder, count=6, size=(48, 40)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


class Counting:
    """A decode callable that counts its calls."""

    def __init__(self, path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        return load_image(self.path)


def eval_transform():
    return tiny_vit().image_transform(train=False)


def test_hits_are_bitwise_the_transform_and_skip_decoding(tmp_path):
    paths = write_images(tmp_path)
    transform = eval_transform()
    cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    assert isinstance(cache, CachedImageSource) and len(cache) == len(paths) and cache.filled == 0
    for path in paths:
        decode = Counting(path)
        first = cache.load(path, decode)
        second = cache.load(path, decode)
        expected = transform(load_image(path))
        assert torch.equal(first, expected) and torch.equal(second, expected)
        assert decode.calls == 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.uncacheable) == (6, 6, 0)
    # A new cache object (a later run, a worker) finds the files and decodes nothing.
    again = DecodedImageCache(tmp_path / "cache", transform, paths)
    assert again.path == cache.path and again.filled == len(paths)
    decode = Counting(paths[0])
    assert torch.equal(again.load(paths[0], decode), transform(load_image(paths[0]))) and decode.calls == 0


def test_random_steps_run_on_the_cached_pixels(tmp_path):
    paths = write_images(tmp_path)
    transform = T.Compose(
        [
            T.ToImage(),
            T.Resize(36),
            T.RandomCrop(32),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    prefix, rest = split_transform(transform)
    assert type(rest.transforms[0]) is T.RandomCrop
    assert [type(s) for s in prefix.transforms] == [T.ToImage, T.Resize]
    cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    for epoch in range(2):  # a miss, then a hit, each against the plain transform from the same seed
        for i, path in enumerate(paths):
            torch.manual_seed(100 * epoch + i)
            got = cache.load(path, lambda p=path: load_image(p))
            torch.manual_seed(100 * epoch + i)
            assert torch.equal(got, transform(load_image(path)))
    assert cache.stats.hits == len(paths)


def test_a_changed_file_or_transform_gets_a_new_cache(tmp_path):
    paths = write_images(tmp_path)
    transform = eval_transform()
    cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    cache.load(paths[0], lambda: load_image(paths[0]))
    before = image_identity(paths[0])
    Image.new("RGB", (48, 40), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))  # a different modification time, whatever the clock's resolution
    assert image_identity(paths[0]) != before
    changed = DecodedImageCache(tmp_path / "cache", transform, paths)
    assert changed.path != cache.path
    assert torch.equal(changed.load(paths[0], lambda: load_image(paths[0])), transform(load_image(paths[0])))
    other = DecodedImageCache(tmp_path / "cache", tiny_vit(image_size=16).image_transform(False), paths)
    assert other.path not in (cache.path, changed.path)


def test_sources_without_identity_and_bad_transforms(tmp_path):
    paths = write_images(tmp_path, count=2)
    transform = eval_transform()
    cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    drawn = lambda: Image.new("RGB", (40, 40), (0, 255, 0))  # noqa: E731
    assert torch.equal(cache.load(drawn, drawn), transform(drawn()))
    assert cache.load(str(tmp_path / "elsewhere.jpg"), lambda: load_image(paths[0])) is not None
    assert cache.stats.uncacheable == 2 and cache.stats.reasons == {"no identity": 2}
    with pytest.raises(ValueError, match="torchvision Compose"):
        split_transform(lambda image: image)
    # A resize on the PIL image before the conversion (timm's layout) is cached as PIL pixels.
    pil_first = T.Compose([T.Resize(20), T.CenterCrop(20), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    prefix, rest = split_transform(pil_first)
    assert [type(s) for s in prefix.transforms] == [T.Resize, T.CenterCrop, T.ToImage]
    assert [type(s) for s in rest.transforms] == [T.ToDtype]


def test_images_of_another_shape_are_served_uncached(tmp_path):
    paths = write_images(tmp_path, count=2) + write_images(tmp_path / "..", count=1, size=(30, 30))
    transform = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])  # decode only: shapes vary
    cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    for path in paths:
        assert torch.equal(cache.load(path, lambda p=path: load_image(p)), transform(load_image(path)))
    assert cache.stats.misses == 2 and cache.stats.reasons == {"other shape": 1}


def test_dataloader_workers_fill_one_shared_cache(tmp_path):
    paths = write_images(tmp_path)
    records = [
        ImageCaptionRecord(image_id=str(i), image=p, captions=[f"image {i}"], split="test")
        for i, p in enumerate(paths)
    ]
    transform = eval_transform()
    dataset = ImageWithCaptionsDataset(records, transform=transform)
    dataset.image_cache = DecodedImageCache(tmp_path / "cache", transform, paths)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda items: items)
    images = [item["image"] for batch in loader for item in batch]
    assert dataset.image_cache.filled == len(paths)
    # The main process has decoded nothing itself; everything now comes from the workers' slots.
    reread = [dataset[i]["image"] for i in range(len(paths))]
    assert dataset.image_cache.stats.hits == len(paths) and dataset.image_cache.stats.misses == 0
    for got, again, path in zip(images, reread, paths, strict=True):
        expected = transform(load_image(path))
        assert torch.equal(got, expected) and torch.equal(again, expected)


def test_data_module_option_gives_the_same_batches(tmp_path):
    paths = write_images(tmp_path, count=8)
    annotations = tmp_path / "pairs.csv"
    with open(annotations, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title", "split"])
        for i, path in enumerate(paths):
            writer.writerow([path, f"a photo number {i}", "train" if i < 6 else "val"])
    tower = tiny_vit()
    from pefttune.testing import tiny_bert

    text = tiny_bert()

    def batches(cache_dir):
        from pefttune.data.preprocessing import Preprocessing

        data = ImageTextDataModule(
            source=Table(str(annotations), split_column="split"),
            test_split=None,
            batch_size=3,
            image_cache_dir=cache_dir,
        )
        data.attach_preprocessing(
            Preprocessing(
                train_transform=tower.image_transform(True),
                eval_transform=tower.image_transform(False),
                tokenize=text.tokenize,
                train_transform_is_deterministic=True,
            )
        )
        data.setup("fit")
        torch.manual_seed(0)
        return list(data.train_dataloader()), list(data.val_dataloader())

    plain_train, plain_val = batches(None)
    for _ in range(2):  # filling, then reading
        cached_train, cached_val = batches(str(tmp_path / "cache"))
        for a, b in zip(plain_train + plain_val, cached_train + cached_val, strict=True):
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache for each transform's image set


def _lit_fit(monkeypatch, skip: bool, epochs: int = 3):
    import lightning as L

    from pefttune.data.datasets import ItemLoader
    from pefttune.module import DualEncoderModule
    from pefttune.strategies import LiT
    from pefttune.testing import tiny_bert

    loads = []
    original = ItemLoader.__call__
    monkeypatch.setattr(
        ItemLoader, "__call__", lambda self, *a, **k: loads.append(1) or original(self, *a, **k)
    )
    if not skip:
        monkeypatch.setattr(DualEncoderModule, "on_train_start", lambda self: None)
    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    data = ImageTextDataModule(source=Synthetic(num_train=16, image_size=32), batch_size=8, val_split=None)
    per_epoch = []

    class Count(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            per_epoch.append(len(loads) - sum(per_epoch))

    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Count()],
    )
    trainer.fit(model, datamodule=data)
    return model, per_epoch


def test_lit_loads_no_training_image_after_its_features_are_cached(monkeypatch):
    skipping, loads = _lit_fit(monkeypatch, skip=True)
    monkeypatch.undo()
    loading, plain_loads = _lit_fit(monkeypatch, skip=False)
    # 16 images x 5 captions = 80 pairs a epoch: without skipping every pair loads its image each epoch;
    # with it, in the first epoch, only pairs whose image was not encoded by an earlier batch (pairs of one
    # image in the same batch both load), and nothing after.
    assert plain_loads == [80, 80, 80]
    assert 16 <= loads[0] < 40 and loads[1:] == [0, 0]
    for (name, a), (_, b) in zip(skipping.named_parameters(), loading.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_skipped_image_without_its_features_is_an_error():
    from pefttune.data.cache import SharedIdSet
    from pefttune.module import DualEncoderModule
    from pefttune.strategies import LiT
    from pefttune.testing import tiny_bert

    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    ids = SharedIdSet(4)
    ids.add([1])
    model._skipped_image_ids.append(ids)
    pixels = torch.zeros(2, 3, 32, 32)
    pixels[1] = float("nan")  # what the dataset yields for a skipped image
    with pytest.raises(RuntimeError, match="skipped an image whose cached features are gone"):
        model._training_image_embeddings({"pixel_values": pixels, "image_ids": torch.tensor([0, 1])})
    # Reloading the image tower's weights forgets the features and the skip set together.
    model._training_image_embeddings(
        {"pixel_values": torch.zeros(1, 3, 32, 32), "image_ids": torch.tensor([2])}
    )
    assert 2 in ids and len(model._image_feature_cache) == 1
    model.load_state_dict(model.state_dict())
    assert len(ids) == 0 and not model._image_feature_cache


def test_loader_workers_see_the_cached_ids():
    import lightning as L

    from pefttune.module import DualEncoderModule
    from pefttune.strategies import LiT
    from pefttune.testing import tiny_bert

    skipped_rows = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rows = torch.isnan(batch["pixel_values"]).flatten(1).all(dim=1)
            skipped_rows.append((trainer.current_epoch, int(rows.sum())))

    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    data = ImageTextDataModule(
        source=Synthetic(num_train=8, image_size=32), batch_size=8, val_split=None, num_workers=2
    )
    L.seed_everything(0)
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Count()],
    ).fit(model, datamodule=data)
    # Second epoch, persistent workers: every row is a skipped image (its features were cached in epoch 1).
    second = [count for epoch, count in skipped_rows if epoch == 1]
    assert second and all(count == 8 for count in second)
