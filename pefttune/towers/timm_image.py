"""Image towers from any ``timm`` model: vision transformers (token blocks) and CNNs (feature-map blocks)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, get_args

import timm
import timm.data
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
        crop_pct: fraction of the resized image the evaluation centre crop keeps (resize to
            ``image_size / crop_pct``, crop ``image_size``); defaults to the model's data config (ImageNet
            models: 0.875-0.95). 1.0 resizes straight to ``image_size``.
        gradient_checkpointing: recompute block activations in the backward pass (timm's own
            checkpointing, non-reentrant) to save activation memory.

    Evaluation images go through timm's transform for the model's data config
    (``timm.data.resolve_model_data_config`` / ``create_transform``): resize to ``image_size / crop_pct``
    with the model's interpolation, centre crop, normalise. Training augmentation keeps the options above
    and the model's interpolation.
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
        crop_pct: float | None = None,
        gradient_checkpointing: bool = False,
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
        config = timm.data.resolve_model_data_config(self.model)
        self.image_size = image_size or int(config["input_size"][-1])
        self.mean = tuple(mean or config["mean"])
        self.std = tuple(std or config["std"])
        self.data_config: dict[str, Any] = {
            **config,
            "input_size": (3, self.image_size, self.image_size),
            "mean": self.mean,
            "std": self.std,
        }
        if crop_pct is not None:
            if not 0 < crop_pct <= 1:
                raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
            self.data_config["crop_pct"] = float(crop_pct)
        self.interpolation = T.InterpolationMode(self.data_config["interpolation"])
        if train_augmentation not in get_args(Augmentation):
            raise ValueError(
                f"train_augmentation must be one of {get_args(Augmentation)}, got {train_augmentation!r}"
            )
        self.train_augmentation = train_augmentation
        self.crop_scale = checked_crop_scale(crop_scale)
        self.projection = make_projection(self.model.num_features, embed_dim)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Block checkpointing by timm (``set_grad_checkpointing``), refused when timm is set to reentrant."""
        set_timm_gradient_checkpointing(self.model, enable)
        self.gradient_checkpointing = enable

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
        """The model's timm evaluation transform; with training augmentation, crop/flip/augment, normalise."""
        augment = self.train_augmentation if train else "none"
        if augment == "none":
            return timm.data.create_transform(**self.data_config, is_training=False)
        size = self.image_size
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
        return timm_token_entry(self.model)

    def _discover_blocks(self) -> list[BlockInfo]:
        return describe_timm_blocks(self.model, "model", self.image_size)


def timm_token_entry(model: nn.Module) -> nn.Module | None:
    """A timm ViT's module after the positional embedding (before ``norm_pre``); None for CNNs."""
    for name in ("patch_drop", "pos_drop"):
        module = getattr(model, name, None)
        if module is not None and hasattr(model, "patch_embed"):
            return module
    return None


def set_timm_gradient_checkpointing(model: nn.Module, enable: bool) -> None:
    """Switch a timm model's block checkpointing; refuse timm's reentrant mode (it loses gradients)."""
    from timm.layers import use_reentrant_ckpt

    if enable and use_reentrant_ckpt():
        raise ValueError(
            "timm is set to reentrant checkpointing (TIMM_REENTRANT_CKPT), which silently drops the "
            "gradients of adapters inside frozen blocks; unset it to use gradient_checkpointing"
        )
    model.set_grad_checkpointing(enable)


def describe_timm_blocks(model: nn.Module, prefix: str, image_size: int) -> list[BlockInfo]:
    """The :class:`BlockInfo` of every residual block of a timm model.

    Args:
        model: the timm model.
        prefix: the model's name relative to the tower (``"model"``, or ``"model.trunk"`` for open_clip).
        image_size: input size of the probe pass that reads feature-map widths (CNN blocks).
    """
    named = _find_block_modules(model)
    widths: dict[int, int] = {}
    if not all(_is_timm_transformer_block(m) for _, m in named):
        widths = probe_block_widths(model, [m for _, m in named], image_size)
    infos = []
    for index, (name, module) in enumerate(named):
        if _is_timm_transformer_block(module):
            attn = module.attn
            infos.append(
                BlockInfo(
                    index=index,
                    name=f"{prefix}.{name}",
                    module=module,
                    layout="tokens",
                    width=int(module.norm1.normalized_shape[0]),
                    norm_position="pre",
                    attention_output=attn.proj,
                    mlp_output=module.mlp.fc2,
                    qkv=_timm_qkv(attn, f"{prefix}.{name}.attn"),
                )
            )
        else:
            infos.append(
                BlockInfo(
                    index=index,
                    name=f"{prefix}.{name}",
                    module=module,
                    layout="map",
                    width=widths[id(module)],
                    norm_position="none",
                )
            )
    return infos


@torch.no_grad()
def probe_block_widths(
    model: nn.Module,
    modules: list[nn.Module],
    image_size: int,
    run: Callable[[torch.Tensor], Any] | None = None,
) -> dict[int, int]:
    """Run one small forward pass of ``model`` to read each of ``modules``' output channels."""
    widths: dict[int, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, _i, out: widths.__setitem__(id(mod), int(_first(out).shape[1])))
        for m in modules
    ]
    was_training = model.training
    model.eval()
    try:
        probe_size = min(image_size, 64)
        parameter = next(model.parameters())
        pixels = torch.zeros(1, 3, probe_size, probe_size, device=parameter.device, dtype=parameter.dtype)
        (run or model)(pixels)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
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
