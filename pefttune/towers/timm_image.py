"""Image towers from any ``timm`` model: vision transformers (token blocks) and CNNs (feature-map blocks)."""

from __future__ import annotations

import logging
from typing import Literal, get_args

import timm
import torch
from torch import nn
from torchvision.transforms import v2 as T

from pefttune.data.preprocessing import ImageTransform
from pefttune.towers.base import (
    BlockInfo,
    ImageTower,
    QKVProjections,
    checked_crop_scale,
    make_projection,
    weights_enabled,
)

log = logging.getLogger(__name__)

Augmentation = Literal["none", "flip", "crop", "crop_flip", "trivialaugment"]


class TimmImageTower(ImageTower):
    """An image tower from a ``timm`` model, pooled by the model's own head (classifier removed).

    Blocks are the model's ``blocks`` (nested sequences flattened, as in EfficientNet) or the ``blocks`` of
    each of its ``stages`` (ConvNeXt), or ``layer1..layer4`` (ResNet). Transformer blocks follow timm's
    convention (``attn.qkv`` or ``attn.{q,k,v}``, ``attn.proj``, ``mlp.fc2``, pre-LayerNorm).

    Args:
        model_name: a timm model name, optionally with a pretrained tag
            (``vit_base_patch16_224.augreg_in21k``); a ``timm/`` prefix is accepted.
        pretrained: load timm's pretrained weights (from the Hub cache); False builds random weights.
        checkpoint_path: load weights from this file instead (a state dict; see ``checkpoint_key_order``).
        embed_dim: width of the projection to the shared space; ``None`` keeps the pooled features as they
            are (no head, as LiT's improved models).
        image_size: input resolution; defaults to the model's pretrained resolution.
        mean: per-channel normalisation mean (defaults to the model's pretrained config).
        std: per-channel normalisation std.
        train_augmentation: ``none`` (deterministic; lets a locked tower's features be cached), ``flip``,
            ``crop`` (random resized crop), ``crop_flip`` or ``trivialaugment`` (crop, flip and
            TrivialAugmentWide, as DueT).
        crop_scale: area range ``(min, max)`` of the random resized crop, as fractions of the image; the
            default (0.5, 1.0) is mild, the papers' Inception-style crop is (0.08, 1.0).
        drop_path_rate: stochastic depth for ViTs.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        embed_dim: int | None = 512,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        train_augmentation: Augmentation = "none",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.model_name = model_name.removeprefix("timm/")
        load_hub_weights = weights_enabled(pretrained) and checkpoint_path is None
        kwargs: dict[str, object] = {"num_classes": 0}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if image_size is not None and _is_vit_like(self.model_name):
            kwargs["img_size"] = image_size
        self.model = timm.create_model(self.model_name, pretrained=load_hub_weights, **kwargs)
        if checkpoint_path is not None and weights_enabled(pretrained):
            self._load_checkpoint(checkpoint_path)
        config = self.model.pretrained_cfg
        self.image_size = image_size or int(config.get("input_size", (3, 224, 224))[-1])
        self.mean = tuple(mean or config.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std or config.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = T.InterpolationMode.BICUBIC
        if train_augmentation not in get_args(Augmentation):
            raise ValueError(
                f"train_augmentation must be one of {get_args(Augmentation)}, got {train_augmentation!r}"
            )
        self.train_augmentation = train_augmentation
        self.crop_scale = checked_crop_scale(crop_scale)
        self.projection = make_projection(self.model.num_features, embed_dim)

    def _load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not fit timm model {self.model_name}: "
                f"missing {missing[:5]}..., unexpected {unexpected[:5]}..."
            )

    # -- preprocessing -----------------------------------------------------------------------------
    def image_transform(self, train: bool) -> ImageTransform:
        """Resize (and augment when training) to ``image_size``, scale to [0, 1], normalise."""
        size = self.image_size
        augment = self.train_augmentation if train else "none"
        steps: list[nn.Module] = [T.ToImage()]
        if augment in ("crop", "crop_flip", "trivialaugment"):
            steps.append(T.RandomResizedCrop(size, scale=self.crop_scale, interpolation=self.interpolation))
        else:
            steps += [T.Resize(size, interpolation=self.interpolation), T.CenterCrop(size)]
        if augment in ("flip", "crop_flip", "trivialaugment"):
            steps.append(T.RandomHorizontalFlip())
        if augment == "trivialaugment":
            steps.append(T.TrivialAugmentWide())
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    @property
    def train_transform_is_deterministic(self) -> bool:
        """True when no random augmentation is configured."""
        return self.train_augmentation == "none"

    # -- encoding ----------------------------------------------------------------------------------
    @property
    def feature_width(self) -> int:
        """Width of timm's pooled features."""
        return int(self.model.num_features)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, feature_width] (timm's head with the classifier removed)."""
        return self.model(pixel_values)

    @property
    def token_entry(self) -> nn.Module | None:
        """For ViTs, the module after the positional embedding (before ``norm_pre``); None for CNNs."""
        for name in ("patch_drop", "pos_drop"):
            module = getattr(self.model, name, None)
            if module is not None and hasattr(self.model, "patch_embed"):
                return module
        return None

    def _discover_blocks(self) -> list[BlockInfo]:
        named = _find_block_modules(self.model)
        widths = {}
        if not all(_is_timm_transformer_block(m) for _, m in named):
            widths = self._probe_block_widths([m for _, m in named])
        infos = []
        for index, (name, module) in enumerate(named):
            if _is_timm_transformer_block(module):
                attn = module.attn
                infos.append(
                    BlockInfo(
                        index=index,
                        name=f"model.{name}",
                        module=module,
                        layout="tokens",
                        width=int(module.norm1.normalized_shape[0]),
                        norm_position="pre",
                        attention_output=attn.proj,
                        mlp_output=module.mlp.fc2,
                        qkv=_timm_qkv(attn, f"model.{name}.attn"),
                    )
                )
            else:
                infos.append(
                    BlockInfo(
                        index=index,
                        name=f"model.{name}",
                        module=module,
                        layout="map",
                        width=widths[id(module)],
                        norm_position="none",
                    )
                )
        return infos

    @torch.no_grad()
    def _probe_block_widths(self, modules: list[nn.Module]) -> dict[int, int]:
        """Run one small forward pass to read each block's output channels."""
        widths: dict[int, int] = {}
        handles = [
            m.register_forward_hook(
                lambda mod, _i, out: widths.__setitem__(id(mod), int(_first(out).shape[1]))
            )
            for m in modules
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            probe_size = min(self.image_size, 64)
            parameter = next(self.model.parameters())
            self.model(
                torch.zeros(1, 3, probe_size, probe_size, device=parameter.device, dtype=parameter.dtype)
            )
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        return widths


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _is_vit_like(model_name: str) -> bool:
    return any(key in model_name for key in ("vit", "deit", "eva", "beit"))


def _is_timm_transformer_block(module: nn.Module) -> bool:
    return hasattr(module, "attn") and hasattr(module, "mlp") and hasattr(module, "norm1")


def _timm_qkv(attn: nn.Module, prefix: str) -> QKVProjections | None:
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        return QKVProjections(names=(f"{prefix}.qkv",), fused=qkv)
    # A fused qkv a strategy has already split into q, k and v (LoRA's SplitQKV) still answers.
    containers = [(attn, prefix)] + ([(qkv, f"{prefix}.qkv")] if qkv is not None else [])
    for container, base in containers:
        for q, k, v in (("q", "k", "v"), ("q_proj", "k_proj", "v_proj")):
            if all(isinstance(getattr(container, n, None), nn.Linear) for n in (q, k, v)):
                return QKVProjections(
                    names=(f"{base}.{q}", f"{base}.{k}", f"{base}.{v}"),
                    query=getattr(container, q),
                    key=getattr(container, k),
                    value=getattr(container, v),
                )
    return None


def _find_block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of a timm model, in order, with their names relative to the model."""
    if isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
        return _flatten(model.blocks, "blocks")
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList):
        found: list[tuple[str, nn.Module]] = []
        for i, stage in enumerate(stages):
            inner = getattr(stage, "blocks", stage)
            prefix = f"stages.{i}.blocks" if hasattr(stage, "blocks") else f"stages.{i}"
            found += _flatten(inner, prefix)
        return found
    layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if layers:
        return [item for name in layers for item in _flatten(getattr(model, name), name)]
    raise ValueError(
        f"cannot find residual blocks in timm model {type(model).__name__}: expected a 'blocks' sequence, "
        "'stages' with blocks, or 'layer1'..'layer4'"
    )


def _flatten(container: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, child in container.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            found += _flatten(child, f"{prefix}.{name}")
        else:
            found.append((f"{prefix}.{name}", child))
    return found
