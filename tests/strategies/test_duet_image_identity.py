"""DueT's multi-positive loss with image identity by content: byte-identical images are one image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pefttune.losses import MultiPositiveInfoNCELoss, image_content_hash
from pefttune.module import DualEncoderModule
from pefttune.strategies.duet import DueT
from pefttune.testing import tiny_bert, tiny_vit


def _embeddings(n: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1), F.normalize(
        torch.randn(n, dim, generator=g), dim=1
    )


def test_content_hash_is_stable_int64_and_equal_for_equal_bytes() -> None:
    a, b = b"\x89PNG...same bytes", b"\x89PNG...other bytes"
    assert image_content_hash(a) == image_content_hash(bytes(a)) != image_content_hash(b)
    assert -(2**63) <= image_content_hash(a) < 2**63
    # Fixed across processes and runs (not Python's salted hash): BLAKE2b-64 of the bytes.
    import hashlib

    digest = hashlib.blake2b(a, digest_size=8).digest()
    assert image_content_hash(a) == int.from_bytes(digest, "little", signed=True)
    assert (
        torch.tensor([image_content_hash(a), image_content_hash(b)], dtype=torch.int64).dtype == torch.int64
    )


def test_content_identity_makes_duplicate_files_positives() -> None:
    images, texts = _embeddings()
    ids = torch.tensor([10, 11, 12, 13])  # four image records ...
    hashes = torch.tensor([7, 8, 7, 9])  # ... of which 10 and 12 are the same file
    text_ids = torch.tensor([0, 1, 2, 3])
    by_id = MultiPositiveInfoNCELoss()(
        images, texts, 10.0, image_ids=ids, text_ids=text_ids, image_hashes=hashes
    )
    by_content = MultiPositiveInfoNCELoss(image_identity="content")(
        images, texts, 10.0, image_ids=ids, text_ids=text_ids, image_hashes=hashes
    )
    # "content" is the id rule applied to the hashes, and differs from the id rule here.
    same = MultiPositiveInfoNCELoss()(images, texts, 10.0, image_ids=hashes, text_ids=text_ids)
    torch.testing.assert_close(by_content, same)
    assert not torch.allclose(by_id, by_content)
    # By hand: anchor 0's positives are captions 0 and 2 under content identity.
    logits = 10.0 * images @ texts.T
    log_probs = logits.log_softmax(dim=1)
    positives = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    i2t = -(torch.where(positives, log_probs, 0.0).sum(1) / positives.sum(1)).mean()
    log_probs_t = logits.T.log_softmax(dim=1)
    t2i = -(torch.where(positives, log_probs_t, 0.0).sum(1) / positives.sum(1)).mean()
    torch.testing.assert_close(by_content, i2t + t2i)


def test_content_identity_without_hashes_names_the_batch_key() -> None:
    images, texts = _embeddings()
    loss = MultiPositiveInfoNCELoss(image_identity="content")
    with pytest.raises(ValueError, match="image_hashes"):
        loss(images, texts, 10.0, image_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"image_hashes must have shape \[4\]"):
        loss(images, texts, 10.0, image_hashes=torch.arange(3))
    with pytest.raises(ValueError, match="image_identity"):
        MultiPositiveInfoNCELoss(image_identity="pixels")  # type: ignore[arg-type]


def test_duet_passes_the_option_to_its_loss_and_the_module_passes_the_hashes() -> None:
    assert DueT().default_loss().image_identity == "id"
    module = DualEncoderModule(tiny_vit(), tiny_bert(), DueT(width=8, image_identity="content"))
    assert module.loss.image_identity == "content"
    batch = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        **module.text_tower.tokenize(["a", "b", "c", "d"]),
        "image_ids": torch.tensor([10, 11, 12, 13]),
        "text_ids": torch.tensor([0, 1, 2, 3]),
    }
    with pytest.raises(ValueError, match="image_hashes"):
        module.training_step(batch, 0)
    loss = module.training_step({**batch, "image_hashes": torch.tensor([7, 8, 7, 9])}, 0)
    assert loss is not None and torch.isfinite(loss)
    with pytest.raises(ValueError, match="image_identity"):
        DueT(image_identity="pixels")  # type: ignore[arg-type]


def test_content_identity_asks_the_data_for_hashes_and_the_batch_carries_them(tmp_path) -> None:
    """End to end on the data side: two ids of one file's bytes get one hash; another file another."""
    from PIL import Image

    from pefttune.data.datasets import PairDataset, TrainCollate
    from pefttune.data.records import ImageCaptionRecord

    model = DualEncoderModule(tiny_vit(), tiny_bert(), DueT(width=8, image_identity="content"))
    assert model.preprocessing.content_hashes
    assert not DualEncoderModule(tiny_vit(), tiny_bert(), DueT(width=8)).preprocessing.content_hashes

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "b.png")
    records = [
        ImageCaptionRecord(name, str(tmp_path / f"{name}.png"), [f"caption of {name}"], "train")
        for name in ("a", "a_copy", "b")
    ]
    preprocessing = model.preprocessing
    dataset = PairDataset(records, transform=preprocessing.eval_transform, content_hashes=True)
    batch = TrainCollate(preprocessing.tokenize)([dataset[i] for i in range(3)])
    hashes = batch["image_hashes"]
    assert hashes.dtype == torch.int64
    assert hashes[0] == hashes[1] != hashes[2]
    assert hashes[0] == image_content_hash((tmp_path / "a.png").read_bytes())
    # The module hands them to the loss: a training step runs under content identity.
    model.train()
    image_embeds, text_embeds = model(batch)
    loss = model.loss(
        image_embeds,
        text_embeds,
        model.logit_scale_value,
        model.logit_bias,
        batch["image_ids"],
        batch["text_ids"],
        image_hashes=batch["image_hashes"],
    )
    assert torch.isfinite(loss)
    without = PairDataset(records, transform=preprocessing.eval_transform)
    assert "image_hashes" not in TrainCollate(preprocessing.tokenize)([without[i] for i in range(3)])
