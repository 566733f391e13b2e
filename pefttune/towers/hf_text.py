"""Text towers from Hugging Face encoders (BERT, MiniLM, RoBERTa and other BERT-layout models)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import AutoModel

# load_tokenizer and offline_wordpiece_tokenizer are re-exported: they lived here before the shared module.
from pefttune.towers._hf import HFEncoder, LazyTokenizer, load_tokenizer, offline_wordpiece_tokenizer
from pefttune.towers.architectures import architecture_config
from pefttune.towers.base import (
    BlockInfo,
    QKVProjections,
    TextTower,
    make_projection,
    pool_tokens,
    quiet_transformers,
    weights_enabled,
)

Pooling = Literal["cls", "mean", "eos"]

__all__ = ["HFTextTower", "Pooling", "load_tokenizer", "offline_wordpiece_tokenizer"]


class HFTextTower(HFEncoder, LazyTokenizer, TextTower):
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
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

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
