import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pefttune.testing import tiny_bert, tiny_clip, tiny_cnn, tiny_vit
from pefttune.towers import (
    CLIPImageTower,
    EfficientNetLite0Tower,
    HFTextTower,
    ImageTower,
    MiniLMTextTower,
    TextTower,
    TimmImageTower,
    architecture_only,
)
from pefttune.towers.offline import efficientnet_lite0_state_dict


def _text_inputs(tower: TextTower, texts=("a red circle", "two small blue squares on the left")):
    return tower.tokenize(list(texts))


def test_every_tower_pair_encodes_and_describes_its_blocks(tower_pair):
    image_tower, text_tower = tower_pair
    pixels = torch.randn(2, 3, image_tower.image_size, image_tower.image_size)
    assert image_tower(pixels).shape == (2, image_tower.embed_dim)
    tokens = _text_inputs(text_tower)
    assert text_tower(**tokens).shape == (2, text_tower.embed_dim)
    for tower in (image_tower, text_tower):
        blocks = tower.blocks()
        assert [b.index for b in blocks] == list(range(len(blocks)))
        for block in blocks:
            assert dict(tower.named_modules())[block.name] is block.module
            if block.is_transformer:
                assert block.layout == "tokens" and block.qkv is not None
                expected = torch.nn.MultiheadAttention if block.qkv.is_packed else torch.nn.Linear
                for name in block.qkv.names:
                    assert isinstance(dict(tower.named_modules())[name], expected)


def test_block_output_layout_and_width_match_a_forward_pass(tower_pair):
    image_tower, text_tower = tower_pair
    seen = {}
    for tower in (image_tower, text_tower):
        for block in tower.blocks():
            key = f"{tower.modality}:{block.name}"
            block.module.register_forward_hook(
                lambda m, i, o, b=block, k=key: seen.__setitem__(k, (b, o[0] if isinstance(o, tuple) else o))
            )
    image_tower(torch.randn(2, 3, image_tower.image_size, image_tower.image_size))
    text_tower(**_text_inputs(text_tower))
    assert seen
    for block, output in seen.values():
        if block.layout == "tokens":
            assert output.ndim == 3 and output.shape[-1] == block.width
        else:
            assert output.ndim == 4 and output.shape[1] == block.width


def test_norm_positions_follow_the_family():
    assert {b.norm_position for b in tiny_vit().blocks()} == {"pre"}
    assert {b.norm_position for b in tiny_bert().blocks()} == {"post"}
    assert {b.norm_position for b in tiny_cnn().blocks()} == {"none"}
    image, text = tiny_clip()
    assert {b.norm_position for b in image.blocks() + text.blocks()} == {"pre"}


def test_fused_qkv_is_reported_for_timm_vits():
    block = tiny_vit().blocks()[0]
    assert block.qkv.is_fused and block.qkv.fused.out_features == 3 * block.width
    assert not tiny_bert().blocks()[0].qkv.is_fused


def test_token_entry_exists_for_transformers_and_not_for_cnns():
    assert tiny_cnn().token_entry is None
    assert tiny_vit().token_entry is not None
    image, text = tiny_clip()
    assert image.token_entry is not None and isinstance(text.token_entry, torch.nn.Embedding)


def test_prompt_slots_follow_the_start_token():
    tower = tiny_bert()
    plain = tower.tokenize(["a red circle"])
    tower.set_prompt_slots([1037, 6302])
    slotted = tower.tokenize(["a red circle"])
    assert slotted["input_ids"][0, 1:3].tolist() == [1037, 6302]
    assert slotted["input_ids"][0, 0] == plain["input_ids"][0, 0]
    assert slotted["input_ids"][0, 3:].tolist() == plain["input_ids"][0, 1:].tolist()
    assert slotted["attention_mask"].sum() == plain["attention_mask"].sum() + 2


def test_long_captions_are_truncated_to_max_length():
    tower = tiny_bert(max_length=16)
    tokens = tower.tokenize(["word " * 500])
    assert tokens["input_ids"].shape[1] == 16


def test_locked_tower_stays_in_eval_mode_and_builds_no_graph():
    tower = tiny_vit()
    tower.lock()
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    out = tower(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad


def test_pooling_options():
    tokens = tiny_bert().tokenize(["a b c", "a"])
    for pooling in ("cls", "mean", "eos"):
        tower = HFTextTower("pefttune/tiny-bert", pretrained=False, pooling=pooling, embed_dim=None)
        assert tower(**tokens).shape == (2, 32)
    with pytest.raises(ValueError, match="unknown pooling"):
        HFTextTower("pefttune/tiny-bert", pretrained=False, pooling="max", embed_dim=None)(**tokens)


def test_architecture_only_paper_backbones_have_their_published_sizes():
    with architecture_only():
        vit = TimmImageTower("timm/vit_base_patch16_224.augreg_in21k", embed_dim=None)
        bert = HFTextTower("bert-base-uncased", embed_dim=None)
    assert sum(p.numel() for p in vit.parameters()) == 85_798_656
    # BERT-base without its pooler: DueT's 108.9M.
    assert sum(p.numel() for p in bert.parameters()) == 108_891_648


def test_unknown_architecture_gives_a_clear_error():
    with architecture_only(), pytest.raises(KeyError, match="no architecture-only config"):
        HFTextTower("nobody/unknown-model")


def test_offline_default_towers_load_real_weights():
    image = EfficientNetLite0Tower(image_size=64, embed_dim=None)
    state = efficientnet_lite0_state_dict()
    for key, value in image.model.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
    # The ImageNet network separates a plain red image from a plain blue one far more than random weights.
    transform = image.image_transform(train=False)
    red = transform(Image.new("RGB", (64, 64), (255, 0, 0)))
    blue = transform(Image.new("RGB", (64, 64), (0, 0, 255)))
    image.eval()
    with torch.no_grad():
        features = image(torch.stack([red, blue]))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    text = MiniLMTextTower(embed_dim=None)
    text.eval()
    tokens = text.tokenize(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(text(**tokens), dim=-1)
    # Real sentence embeddings: paraphrases are much closer than unrelated text.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_offline_preprocessing_is_minus_127_over_128():
    tower = EfficientNetLite0Tower(pretrained=False, image_size=8)
    pixels = tower.image_transform(train=False)(Image.new("RGB", (8, 8), (255, 127, 0)))
    expected = torch.tensor([(255 - 127) / 128, 0.0, -127 / 128])
    assert torch.allclose(pixels[:, 0, 0], expected, atol=1e-5)


def test_isinstance_contract():
    image, text = tiny_clip()
    assert isinstance(image, ImageTower) and isinstance(text, TextTower)


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: TimmImageTower("test_vit", pretrained=False, image_size=32, **kw),
        lambda **kw: EfficientNetLite0Tower(pretrained=False, image_size=32, **kw),
        lambda **kw: CLIPImageTower("pefttune/tiny-clip", pretrained=False, **kw),
    ],
    ids=["timm", "offline", "clip"],
)
def test_random_resized_crop_uses_the_configured_area_range(build):
    def crop_scales(tower):
        steps = tower.image_transform(train=True).transforms
        return [step.scale for step in steps if isinstance(step, T.RandomResizedCrop)]

    assert crop_scales(build(train_augmentation="crop_flip")) == [(0.5, 1.0)]
    assert crop_scales(build(train_augmentation="crop_flip", crop_scale=(0.08, 1.0))) == [(0.08, 1.0)]
    # Evaluation never crops at random.
    assert not any(
        isinstance(step, T.RandomResizedCrop)
        for step in build(crop_scale=(0.08, 1.0)).image_transform(train=False).transforms
    )
    with pytest.raises(ValueError, match="crop_scale"):
        build(train_augmentation="crop_flip", crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="train_augmentation"):
        build(train_augmentation="crop_and_flip")
