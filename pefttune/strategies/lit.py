"""LiT: locked-image text tuning (Zhai et al., CVPR 2022)."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from torch import nn

from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy
from pefttune.towers.base import ImageTower, TextTower

log = logging.getLogger(__name__)

# The transformer convention (BERT, GPT-2, CLIP's text model) when a model has no initializer of its own.
_DEFAULT_INIT_STD = 0.02


def reinitialise_text_model(model: nn.Module) -> str:
    """Re-initialise a text backbone the way its own architecture initialises a new model.

    A Hugging Face model (``PreTrainedModel``) runs its own ``_init_weights`` over every submodule, as
    ``from_config`` / ``post_init`` would: for BERT, linear and embedding weights from N(0,
    ``initializer_range`` = 0.02), biases 0, LayerNorm weight 1 and bias 0, the padding row 0. PyTorch's
    layer defaults (``reset_parameters``: Kaiming-uniform linears, N(0, 1) embeddings) are a different
    distribution, 50 times wider for embeddings, and not how these models are trained from scratch.
    Transformers marks loaded modules as initialised so that ``initialize_weights`` skips them; the marks
    are removed first.

    Other modules get the same convention: linear and embedding weights from N(0, std) with std the
    model config's ``initializer_range`` (0.02 without one), biases 0, normalisation layers weight 1 and
    bias 0.

    Args:
        model: the text backbone (a tower's ``model``).

    Returns:
        A description of the initialiser used (for the log).
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        for item in [*model.modules(), *model.parameters(), *model.buffers()]:
            if hasattr(item, "_is_hf_initialized"):
                delattr(item, "_is_hf_initialized")
        model.initialize_weights()
        return f"{type(model).__name__}._init_weights"
    config = getattr(model, "config", None)
    std = float(getattr(config, "initializer_range", None) or _DEFAULT_INIT_STD)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return f"N(0, {std:g}) for linear and embedding weights"


class LiT(AdaptationStrategy):
    """LiT: lock the whole image tower and train the text tower.

    Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022.

    * The image tower, its projection included, is frozen, kept in eval mode (no dropout, stochastic depth
      or BatchNorm updates) and run under ``torch.no_grad`` (see :meth:`Tower.lock`). Configure the image
      tower with ``embed_dim: null`` to use its pooled features directly, as LiT's improved models do, and
      give the text tower a projection to the image feature width.
    * The text tower trains from its pretrained weights (``text_init="pretrained"``, LiT's "LU") or from
      scratch (``"scratch"``, "Lu"; DueT's LiT baseline), re-initialised with the text model's own
      initialiser (:func:`reinitialise_text_model`; BERT: N(0, 0.02)), not PyTorch's layer defaults.
    * Learnable temperature starting at scale 10 (``log 10``), not CLIP's 1/0.07.

    Because the locked tower is deterministic, :class:`~pefttune.module.DualEncoderModule` computes each
    training image's features once and reuses them when the training transform has no augmentation.

    Args:
        text_init: ``pretrained`` or ``scratch``.
        **kwargs: see :class:`AdaptationStrategy`.
    """

    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=10.0, learnable=True)
    # The whole text tower trains and is in the checkpoint: where it started does not matter on loading.
    init_only_arguments: ClassVar[tuple[str, ...]] = ("text_init",)

    def __init__(self, text_init: Literal["pretrained", "scratch"] = "pretrained", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if text_init not in ("pretrained", "scratch"):
            raise ValueError(f"text_init must be 'pretrained' or 'scratch', got {text_init!r}")
        self.text_init = text_init

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Lock the image tower; unfreeze (and optionally re-initialise) the text tower."""
        image_tower.lock()
        if self.text_init == "scratch":
            initialiser = reinitialise_text_model(text_tower.model)
            log.info("LiT: text tower re-initialised from scratch (%s)", initialiser)
        text_tower.requires_grad_(True)
