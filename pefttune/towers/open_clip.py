"""Image and text towers from ``open_clip`` models (OpenAI CLIP, LAION, DataComp, MetaCLIP, SigLIP, ...).

A tower is built from an open_clip model name (``ViT-B-32``, ``ViT-B-16-SigLIP``, ``hf-hub:org/repo``,
``local-dir:/path``) and an optional ``pretrained`` tag (``openai``, ``laion2b_s34b_b79k``) or checkpoint
file; ``open_clip.create_model`` builds it, so every checkpoint open_clip reads loads here. Each tower keeps
its half of the model and drops the other. Supported halves:

* image: open_clip's ``VisionTransformer`` (OpenAI-style blocks with ``nn.MultiheadAttention``) and
  ``TimmModel`` (a timm trunk, e.g. SigLIP, EVA, ConvNeXt), not the ModifiedResNet (RN50 ...) towers;
* text: open_clip's ``TextTransformer`` (causal CLIP text or bidirectional SigLIP text), not Hugging Face
  text encoders (``hf_model_name``: use :class:`~pefttune.towers.HFTextTower`) nor CoCa.

The output projections (``visual.proj``, ``text_projection``: parameters ``x @ P``) become ``nn.Linear``
modules (weight ``P.T``, the same function) under ``projection``, the ``head`` group; the model's logit
scale, and logit bias for SigLIP models, are carried over (:attr:`Tower.pretrained_logit_scale`,
:attr:`Tower.pretrained_logit_bias`); towers of a model with a logit bias prefer the sigmoid loss.

``nn.MultiheadAttention`` applies its packed q/k/v projection and its output projection without calling a
module; blocks report it as a packed attention (:attr:`QKVProjections.packed`), adapters on the attention
branch hook the attention module's output, and LoRA splits it into linears first
(:class:`~pefttune.layers.split_qkv.SplitMultiheadAttention`, the same function).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision.transforms import v2 as T

from pefttune.data.preprocessing import ImageTransform
from pefttune.layers.split_qkv import SplitMultiheadAttention
from pefttune.losses import ContrastiveLoss, SigLIPLoss
from pefttune.towers.base import (
    BlockInfo,
    ImageTower,
    QKVProjections,
    TextTower,
    Tower,
    checked_crop_flip_augmentation,
    checked_crop_scale,
    pool_tokens,
    random_crop_flip_transform,
    weights_enabled,
)
from pefttune.towers.timm_image import describe_timm_blocks, set_timm_gradient_checkpointing, timm_token_entry

log = logging.getLogger(__name__)

#: Tiny open_clip configs shipped with pefttune (for tests and examples), registered with open_clip.
TINY_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"


@functools.cache
def register_pefttune_configs() -> None:
    """Add pefttune's tiny model configs (``pefttune-tiny-openclip``, ...) to open_clip's registry."""
    import open_clip

    open_clip.add_model_config(TINY_CONFIG_DIR)


def build_open_clip(model_name: str, pretrained: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """An open_clip model (custom-text layout, ``model.text``) and its preprocessing config.

    Inside :func:`~pefttune.towers.architecture_only` nothing is read or downloaded: the architecture of
    ``model_name`` is built with random weights; a ``pretrained`` tag still sets the preprocessing and
    activation (QuickGELU) its checkpoint expects, from open_clip's table.

    Args:
        model_name: an open_clip model name, ``hf-hub:`` or ``local-dir:`` identifier.
        pretrained: a pretrained tag of ``model_name``, a checkpoint file, or ``None`` (random weights).
    """
    import open_clip

    register_pefttune_configs()
    loaded = pretrained is not None and weights_enabled(True)
    if pretrained is not None and not os.path.isfile(pretrained) and weights_enabled(True):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tags and pretrained not in tags:
            raise ValueError(
                f"open_clip pretrained={pretrained!r} is neither a file nor a tag of {model_name} "
                f"(tags: {', '.join(tags)})"
            )
    kwargs: dict[str, Any] = {"force_custom_text": True}
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if tag:
        # open_clip only warns when a tag was trained with QuickGELU and the config uses GELU (ViT-B-32 +
        # "openai"); build what the checkpoint expects, and preprocess as it was trained.
        kwargs["force_quick_gelu"] = bool(tag.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = {
            k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag
        }
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    if not loaded:  # random weights are what was asked for: no "initialized randomly" warning
        root.addFilter(quiet)
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained if loaded else None, load_weights=loaded, **kwargs
        )
    except RuntimeError as error:
        raise ValueError(
            f"cannot build open_clip model {model_name!r} (pretrained={pretrained!r}): {error}"
        ) from error
    finally:
        root.removeFilter(quiet)
    model.train()
    return model, open_clip.get_model_preprocess_cfg(model)


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's warning that a model was initialised randomly (when that was the request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _linear_from_matrix(matrix: torch.Tensor | None) -> nn.Module:
    """``x @ matrix`` as an ``nn.Linear`` (weight ``matrix.T``), or the identity for ``None``."""
    if matrix is None:
        return nn.Identity()
    linear = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False, device=matrix.device, dtype=matrix.dtype)
    with torch.no_grad():
        linear.weight.copy_(matrix.detach().T)
    return linear


def _output_width(module: nn.Module, default: int) -> int:
    """Output width of a projection: its last linear's ``out_features``, or ``default`` without one."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else default


def _carry_scale_and_bias(tower: Tower, model: nn.Module) -> None:
    tower.pretrained_logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    bias = getattr(model, "logit_bias", None)
    tower.pretrained_logit_bias = None if bias is None else float(bias.detach().float().reshape(-1)[0])


def _transformer_blocks(resblocks: nn.ModuleList, prefix: str) -> list[BlockInfo]:
    """BlockInfo of open_clip's ``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock`` blocks."""
    infos = []
    for index, block in enumerate(resblocks):
        name = f"{prefix}.{index}"
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            # Packed q/k/v and a functional output projection: the attention module's own output (a tuple
            # whose first item is the attention branch, before ls_1 and the residual add) is the hook point.
            attention_output: nn.Module = attn
            qkv: QKVProjections | None = QKVProjections(names=(f"{name}.attn",), packed=attn)
        elif isinstance(attn, SplitMultiheadAttention):
            attention_output = attn.out_proj
            qkv = QKVProjections(
                names=tuple(f"{name}.attn.{n}" for n in ("q_proj", "k_proj", "v_proj")),
                query=attn.q_proj,
                key=attn.k_proj,
                value=attn.v_proj,
            )
        else:
            # open_clip's own Attention (qk-norm, scaled-cosine blocks): its output projection is a module,
            # its packed in-projection is not (LoRA's qkv preset refuses these blocks, "out"/"mlp" work).
            attention_output = attn.out_proj
            qkv = None
        infos.append(
            BlockInfo(
                index=index,
                name=name,
                module=block,
                layout="tokens",
                width=int(block.ln_1.normalized_shape[0]),
                norm_position="pre",
                attention_output=attention_output,
                mlp_output=block.mlp.c_proj,
                qkv=qkv,
            )
        )
    return infos


class OpenCLIPImageTower(ImageTower):
    """The image tower of an open_clip model (``VisionTransformer`` or a timm trunk).

    Args:
        model_name: an open_clip model name (``ViT-B-32``, ``ViT-B-16-SigLIP``, ...), ``hf-hub:org/repo`` or
            ``local-dir:/path``.
        pretrained: a pretrained tag of the model (``openai``, ``laion2b_s34b_b79k``, ...) or a checkpoint
            file; ``None`` builds random weights. Ignored (random weights, nothing read) inside
            :func:`~pefttune.towers.architecture_only`.
        train_augmentation: ``none`` (training images go through the evaluation transform) or
            ``crop_flip`` (random resized crop with the model's interpolation, horizontal flip).
        crop_scale: area range ``(min, max)`` of the random resized crop.
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).

    Evaluation preprocessing is open_clip's (``image_transform_v2`` with the model's preprocessing config:
    size, mean/std, interpolation, resize mode).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        train_augmentation: Literal["none", "crop_flip"] = "none",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.model_name = model_name
        self.pretrained = pretrained
        model, preprocess = build_open_clip(model_name, pretrained)
        _carry_scale_and_bias(self, model)
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            self.kind: Literal["transformer", "timm"] = "transformer"
            self.projection = _linear_from_matrix(visual.proj)
            width = visual.proj.shape[0] if visual.proj is not None else visual.transformer.width
            self._feature_width = int(width)
            visual.proj = None
        elif isinstance(visual, TimmModel):
            self.kind = "timm"
            self.projection = visual.head
            visual.head = nn.Identity()
            self._feature_width = int(visual.trunk.num_features)
        else:
            raise ValueError(
                f"open_clip model {model_name!r} has a {type(visual).__name__} image tower; supported are "
                "VisionTransformer and timm trunks (TimmModel)"
            )
        self.model = visual
        del model  # the text half is not kept
        self.preprocess_cfg = preprocess
        size = preprocess["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.train_augmentation = checked_crop_flip_augmentation(train_augmentation)
        self.crop_scale = checked_crop_scale(crop_scale)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def preferred_loss(self) -> ContrastiveLoss | None:
        """The sigmoid loss for SigLIP models (those with a logit bias), else the strategy decides."""
        return SigLIPLoss() if self.pretrained_logit_bias is not None else None

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """open_clip's (non-reentrant) block checkpointing, or timm's for a timm trunk."""
        if self.kind == "timm":
            set_timm_gradient_checkpointing(self.model.trunk, enable)
        else:
            self.model.set_grad_checkpointing(enable)
        self.gradient_checkpointing = enable

    def image_transform(self, train: bool) -> ImageTransform:
        """open_clip's evaluation transform; with ``crop_flip`` training, a random resized crop and a flip."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        config = PreprocessCfg(**self.preprocess_cfg)
        if not (train and self.train_augmentation == "crop_flip"):
            return image_transform_v2(config, is_train=False)
        interpolation = T.InterpolationMode(config.interpolation)
        return random_crop_flip_transform(
            self.image_size, self.crop_scale, interpolation, config.mean, config.std
        )

    @property
    def train_transform_is_deterministic(self) -> bool:
        """True without augmentation."""
        return self.train_augmentation == "none"

    @property
    def feature_width(self) -> int:
        """Width of the pooled features entering the projection."""
        return self._feature_width

    @property
    def embed_dim(self) -> int:
        """Width of the projected embedding."""
        return _output_width(self.projection, self.feature_width)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, feature_width] (open_clip's pooling; the projection is the tower's)."""
        return self.model(pixel_values)

    @property
    def token_entry(self) -> nn.Module | None:
        """The module after the positional embedding (``patch_dropout``; timm trunks as timm towers)."""
        if self.kind == "timm":
            return timm_token_entry(self.model.trunk)
        return self.model.patch_dropout

    def _discover_blocks(self) -> list[BlockInfo]:
        if self.kind == "timm":
            return describe_timm_blocks(self.model.trunk, "model.trunk", self.image_size)
        return _transformer_blocks(self.model.transformer.resblocks, "model.transformer.resblocks")


class OpenCLIPTokenizer:
    """open_clip's tokenizer behind the calls pefttune makes.

    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` gives a text's word-piece ids (APEX's
    context initialisation); :meth:`encode_batch` gives padded ids and the attention mask.

    Args:
        backend: an open_clip tokenizer (``SimpleTokenizer``, ``HFTokenizer``, ``SigLipTokenizer``) or a
            Hugging Face tokenizer (the offline fallback of architecture-only towers).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _hf(self) -> Any | None:
        """The Hugging Face tokenizer inside the backend, if any."""
        from transformers import PreTrainedTokenizerBase

        if isinstance(self.backend, PreTrainedTokenizerBase):
            return self.backend
        return getattr(self.backend, "tokenizer", None)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        """``{"input_ids": ids}`` of one text (no start/end tokens when ``add_special_tokens`` is False)."""
        if not isinstance(text, str):
            raise TypeError("OpenCLIPTokenizer.__call__ takes one string; use encode_batch for a batch")
        hf = self._hf()
        if hf is not None:
            return {"input_ids": list(hf(text, add_special_tokens=add_special_tokens)["input_ids"])}
        ids = list(self.backend.encode(text))
        if add_special_tokens:
            ids = [self.backend.sot_token_id, *ids, self.backend.eot_token_id]
        return {"input_ids": ids}

    def encode_batch(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, length] padded as open_clip pads them, and the mask of the real tokens."""
        from transformers import PreTrainedTokenizerBase

        if isinstance(self.backend, PreTrainedTokenizerBase):
            encoded = self.backend(
                texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
            )
            return encoded["input_ids"], encoded["attention_mask"]
        ids = self.backend(texts, context_length=length)
        hf = self._hf()
        if hf is not None:
            return ids, (ids != hf.pad_token_id).long()
        # SimpleTokenizer: start, words, end, then zeros (which is also a word id): mask up to the end token.
        end = (ids == self.backend.eot_token_id).long().argmax(dim=1, keepdim=True)
        return ids, (torch.arange(length).unsqueeze(0) <= end).long()


class OpenCLIPTextTower(TextTower):
    """The text tower of an open_clip model (its ``TextTransformer``).

    Pooling follows the model's ``pool_type``: ``argmax`` (CLIP: the end-of-text token, found as the last
    attended token), ``eos``, ``first``, or ``last`` (SigLIP: every caption padded to ``max_length``, the
    last position pooled, no padding mask, as trained). Causal models see positions ``0..L-1`` of their
    causal mask, so captions are padded only to the longest of the batch.

    Args:
        model_name: an open_clip model name, ``hf-hub:`` or ``local-dir:`` identifier.
        pretrained: a pretrained tag or checkpoint file; ``None`` builds random weights.
        max_length: maximum tokens per caption (default: the model's context length, CLIP 77, SigLIP 64).
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        max_length: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        from open_clip.transformer import TextTransformer

        model, _ = build_open_clip(model_name, pretrained)
        text = getattr(model, "text", None)
        if not isinstance(text, TextTransformer):
            raise ValueError(
                f"open_clip model {model_name!r} has a {type(text).__name__} text tower; supported is "
                "open_clip's TextTransformer (use HFTextTower for Hugging Face text encoders)"
            )
        if text.cls_emb is not None or text.pool_type == "none":
            raise ValueError(f"open_clip model {model_name!r}: CoCa-style text towers are not supported")
        context = int(text.context_length)
        super().__init__(max_length=context if max_length is None else int(max_length))
        if self.max_length > context:
            raise ValueError(f"max_length {self.max_length} exceeds {model_name}'s context length {context}")
        self.model_name = model_name
        self.pretrained = pretrained
        self._loaded = pretrained is not None and weights_enabled(True)
        _carry_scale_and_bias(self, model)
        projection = text.text_projection
        self.projection = projection if isinstance(projection, nn.Linear) else _linear_from_matrix(projection)
        text.text_projection = None
        self.model = text
        del model  # the image half is not kept
        self.pool_type = text.pool_type
        # SigLIP-style towers pool the last position of captions padded to the context length.
        self.pad_to_max_length = self.pool_type == "last"
        self._tokenizer: OpenCLIPTokenizer | None = None
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def preferred_loss(self) -> ContrastiveLoss | None:
        """The sigmoid loss for SigLIP models (those with a logit bias), else the strategy decides."""
        return SigLIPLoss() if self.pretrained_logit_bias is not None else None

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """open_clip's (non-reentrant) block checkpointing."""
        self.model.set_grad_checkpointing(enable)
        self.gradient_checkpointing = enable

    @property
    def tokenizer(self) -> OpenCLIPTokenizer:
        """open_clip's tokenizer for the model (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = OpenCLIPTokenizer(self._load_tokenizer())
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        import open_clip

        try:
            return open_clip.get_tokenizer(self.model_name)
        except (OSError, ValueError, RuntimeError, ImportError) as error:
            if self._loaded:
                raise OSError(f"cannot load open_clip's tokenizer of {self.model_name!r}: {error}") from error
            from pefttune.towers._hf import offline_wordpiece_tokenizer

            log.warning(
                "open_clip tokenizer of %r is not available offline (%s); using the packaged WordPiece "
                "tokenizer (fine for architecture-only towers, not for real checkpoints)",
                self.model_name,
                error,
            )
            return offline_wordpiece_tokenizer()

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's token ids, trimmed to the longest caption unless the tower pools the last position."""
        input_ids, attention_mask = self.tokenizer.encode_batch(texts, max_length)
        if not self.pad_to_max_length:
            longest = max(int(attention_mask.sum(dim=1).max()), 1)
            input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        return input_ids, attention_mask

    @property
    def feature_width(self) -> int:
        """The text transformer's width."""
        return int(self.model.width)

    @property
    def embed_dim(self) -> int:
        """Width of the projected embedding."""
        return _output_width(self.projection, self.feature_width)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled final-LayerNorm state [B, width] (see the class docstring for the pooling)."""
        text = self.model
        length = input_ids.shape[1]
        if length > text.num_pos:
            raise ValueError(f"{length} tokens exceed the text tower's {text.num_pos} positions")
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(input_ids).to(cast) + text.positional_embedding[:length].to(cast)
        mask = None if text.attn_mask is None else text.attn_mask[:length, :length]
        if text.use_pad_mask:
            padding = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            padding = padding.masked_fill(attention_mask == 0, float("-inf"))
            padding = padding[:, None, :].expand(-1, length, -1).repeat_interleave(text.heads, 0)
            mask = padding if mask is None else mask.unsqueeze(0) + padding
        x = text.ln_final(text.transformer(x, attn_mask=mask))
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "eos":
            position = (input_ids == text.eos_id).long().argmax(dim=1)
            return x[torch.arange(x.shape[0], device=x.device), position]
        return pool_tokens(x, attention_mask, "eos")  # argmax: the end-of-text token, the last attended one

    @property
    def token_entry(self) -> nn.Module:
        """The token-embedding table."""
        return self.model.token_embedding

    def _discover_blocks(self) -> list[BlockInfo]:
        return _transformer_blocks(self.model.transformer.resblocks, "model.transformer.resblocks")
