"""LoRA on both towers through ``peft``, following the CLIP-LoRA recipe (Zanella and Ben Ayed, CVPRW 2024)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from pefttune.layers.frozen_batchnorm import freeze_batchnorm_statistics
from pefttune.layers.split_qkv import QKV_PARTS, SplitQKV, split_packed_attention
from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy, unfreeze_projection
from pefttune.towers.base import BlockInfo, ImageTower, TextTower, Tower

#: peft's adapter name; parameters are called ``<target>.lora_A.default.weight`` and ``lora_B``.
ADAPTER_NAME = "default"
#: The parts a target preset may combine with ``+`` (``"qkv"``, ``"qkv+out"``, ``"qkv+out+mlp"``, ...).
PRESET_PARTS = ("qkv", "out", "mlp")

TowerChoice = Literal["both", "image", "text"]


class LoRA(AdaptationStrategy):
    """Low-rank updates of the attention projections of both towers, injected with ``peft``.

    Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models" (CLIP-LoRA), CVPRW 2024,
    arXiv 2405.18541; the module is Hu et al.'s LoRA (ICLR 2022). ``docs/methods/lora.md`` has the formulas
    and the recipe. Each targeted layer ``W0`` computes ``W0 x + b + s * B A dropout(x)`` with
    ``A`` (r x d_in, kaiming-uniform) and ``B`` (d_out x r, zeros, so training starts at the pretrained
    model), ``s = alpha / sqrt(r)`` (rsLoRA) and dropout on the LoRA input only.

    Defaults are the paper's: rank 2, alpha 1, rsLoRA scaling, dropout 0.25, biases frozen, the query, key
    and value projections of every attention block of both towers, a fixed logit scale of 100 and
    symmetric InfoNCE (the retrieval form of CLIP-LoRA's class-prompt cross-entropy). The optimiser recipe
    (AdamW lr 2e-4, weight decay 1e-2, cosine to 1e-6 without warm-up, batch 32, fp16 mixed precision)
    lives in ``configs/paper/lora_clip_vitb16.yaml``. What trains: the LoRA ``A``/``B`` matrices (group
    ``method``) and, see ``train_projections``, the projection heads of towers that have no pretrained one
    (group ``head``). Everything else, biases and norms included, is frozen.

    Targets are found through the towers' structural interface (:meth:`Tower.blocks`), never by model
    family. Deviations from the reference, and why:

    * A fused ``qkv`` linear (timm ViT) is replaced by :class:`~pefttune.layers.split_qkv.SplitQKV`, three
      linears holding its row-thirds whose outputs are concatenated (the same function), and q, k and v each
      get their own update, as CLIP-LoRA's split ``nn.MultiheadAttention``. The parameter count
      (3 r (d_in + d) per block) and the function equal the reference; the frozen weights are renamed from
      ``attn.qkv.weight`` to ``attn.qkv.{q,k,v}.base_layer.weight``. timm attentions that add separate
      q/v biases (EVA, BEiT) are switched to ``qkv_bias_separate`` so that they call the split linear.
    * ``nn.MultiheadAttention`` (OpenAI CLIP / open_clip blocks) applies its packed q/k/v weight and its
      output projection without calling a module; it is replaced by
      :class:`~pefttune.layers.split_qkv.SplitMultiheadAttention` (four linears, the same function) before
      the targets are resolved, so q, k, v (and ``out``) are adapted as on Hugging Face CLIP.
    * On a convolutional tower (feature-map blocks) every preset targets the dense (ungrouped) 1x1
      convolutions and linears of each block: pointwise expansion and projection, and squeeze-excitation's
      reduce/expand where present. They are the per-position channel-mixing linears of a CNN, the nearest
      counterpart of the attention projections. Depthwise convolutions (one k x k filter per channel have no
      channel-mixing matrix to make low-rank; peft also needs ``r % groups == 0`` and cannot merge them) and
      dense 3x3 convolutions (stem, EdgeResidual expansion) are left out. BatchNorm layers of an adapted
      tower, or of a tower of which only the head trains, always run with their frozen running statistics
      (eval mode), so the backbone is truly frozen and an adapter-only checkpoint reproduces the trained
      model.
    * ``train_projections="auto"`` trains the projection head of a tower that did not come with one from
      a dual-encoder checkpoint (a tower without a checkpoint logit scale: its head is new and random). CLIP
      towers keep CLIP's frozen projections, as in the paper; on the offline default (EfficientNet-Lite0 and
      MiniLM with new heads) the heads train, because a frozen random head would leave LoRA to align two
      unrelated random spaces through rank-2 updates.
    * A tower that gets no LoRA (``towers="image"`` or ``"text"``) and whose head does not train is locked
      (eval mode, no gradient), as LiT locks its image tower.

    The pretrained weights of a targeted layer move to ``<target>.base_layer.weight`` (peft's layout), so a
    full Lightning checkpoint of a LoRA model loads into a LoRA model built from the same config; the
    adapter alone is saved and loaded with :mod:`pefttune.checkpointing`.

    Args:
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / sqrt(r)`` (``rslora``) or ``alpha / r``.
        dropout: dropout probability on the LoRA branch input (training only).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (CLIP-LoRA); False gives LoRA's ``alpha / r``.
        targets: a preset, ``"qkv"`` (default), ``"out"`` (attention output projection), ``"mlp"`` (every
            other linear of a transformer block) or a ``+`` combination such as ``"qkv+out"``; or a list of
            module-name patterns (shell-style wildcards) matched against names relative to the tower
            (``model.encoder.layer.*.attention.self.query``) or their dotted suffixes (``q_proj``). Patterns
            select ``nn.Linear`` and ``nn.Conv2d`` layers inside ``tower.model``; a fused qkv linear that a
            pattern selects is split first.
        towers: which towers get LoRA: ``both``, ``image`` or ``text``.
        train_projections: train the towers' projection heads: ``True``, ``False`` or ``"auto"`` (only heads
            that are new, see above).
        **kwargs: ``temperature``, ``group_lr`` and ``no_decay_norms_and_biases``, see
            :class:`AdaptationStrategy`.
    """

    prefix: ClassVar[str] = "lora_"
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=100.0, learnable=False)

    def __init__(
        self,
        r: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        rslora: bool = True,
        targets: str | list[str] = "qkv",
        towers: TowerChoice = "both",
        train_projections: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(r) != r or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if towers not in ("both", "image", "text"):
            raise ValueError(f"towers must be 'both', 'image' or 'text', got {towers!r}")
        if train_projections not in (True, False, "auto"):
            raise ValueError(f"train_projections must be true, false or 'auto', got {train_projections!r}")
        self.preset: frozenset[str] | None = None
        self.patterns: tuple[str, ...] = ()
        if isinstance(targets, str):
            self.preset = parse_preset(targets)
        else:
            self.patterns = tuple(str(p) for p in targets)
            if not self.patterns:
                raise ValueError("targets is an empty list: name at least one module pattern or a preset")
        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rslora = bool(rslora)
        self.towers = towers
        self.train_projections = train_projections
        self.targets: str | list[str] = targets if isinstance(targets, str) else list(self.patterns)
        #: Per modality, the adapted module names relative to the tower (filled by :meth:`adapt`).
        self.target_names: dict[str, list[str]] = {}
        # A plain list (not registered): the layers belong to the towers, not to the strategy.
        self._lora_layers: list[LoraLayer] = []

    # -- building ----------------------------------------------------------------------------------
    def lora_config(self, target_modules: Sequence[str]) -> LoraConfig:
        """The peft configuration for ``target_modules`` (names relative to ``tower.model``)."""
        # A regex is matched against whole module names (a list would also match dotted suffixes).
        pattern = "^(" + "|".join(re.escape(name) for name in target_modules) + ")$"
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_rslora=self.rslora,
            bias="none",
            init_lora_weights=True,
            target_modules=pattern,
        )

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Inject LoRA into the selected towers and unfreeze the LoRA weights (and heads, if asked)."""
        for tower in (image_tower, text_tower):
            adapted = self.towers in ("both", tower.modality)
            if adapted:
                self._adapt_tower(tower)
            train_head = self._trains_projection(tower)
            if train_head:
                unfreeze_projection(tower)
            if not adapted and not train_head:
                tower.lock()
            elif not adapted:
                # Only the head trains: the backbone runs in train mode but must stay frozen, BatchNorm
                # statistics included (an adapted tower gets the same in _adapt_tower).
                freeze_batchnorm_statistics(tower.model)

    def _adapt_tower(self, tower: Tower) -> None:
        # nn.MultiheadAttention (open_clip) applies q/k/v and its output projection without calling a module:
        # split it into linears first (the same function), so the targets below are modules peft can wrap.
        split_packed_attention(tower)
        names = self.resolve_targets(tower)
        if not names:
            raise ValueError(
                f"LoRA targets {self._describe_targets()} select no layer of {type(tower).__name__}"
            )
        outside = [n for n in names if not n.startswith("model.")]
        if outside:
            raise ValueError(f"LoRA targets must lie inside the backbone (tower.model); got {outside}")
        fused = {b.qkv.names[0] for b in tower.blocks() if b.qkv is not None and b.qkv.is_fused}
        final: list[str] = []
        for name in names:
            if name in fused:
                _call_fused_qkv_module(tower, name)
                _replace_submodule(tower, name, SplitQKV.from_fused(tower.get_submodule(name)))
                final += [f"{name}.{part}" for part in QKV_PARTS]
            else:
                final.append(name)
        config = self.lora_config([n.removeprefix("model.") for n in final])
        inject_adapter_in_model(config, tower.model, adapter_name=ADAPTER_NAME)
        # The cached BlockInfo references point at the linears peft just wrapped.
        tower.refresh_blocks()
        self._lora_layers += [m for m in tower.model.modules() if isinstance(m, LoraLayer)]
        self.target_names[tower.modality] = final
        freeze_batchnorm_statistics(tower.model)
        for name, parameter in tower.named_parameters():
            parameter.requires_grad_(_is_lora_name(name, self.prefix))

    def _trains_projection(self, tower: Tower) -> bool:
        if not any(True for _ in tower.projection.parameters()):
            return False
        if self.train_projections == "auto":
            return tower.pretrained_logit_scale is None
        return bool(self.train_projections)

    def resolve_targets(self, tower: Tower) -> list[str]:
        """Names (relative to ``tower``) of the layers this configuration adapts, before any split."""
        if self.preset is not None:
            names = [n for block in tower.blocks() for n in _preset_targets(tower, block, self.preset)]
        else:
            names = [
                name
                for name, module in tower.named_modules()
                if isinstance(module, nn.Linear | nn.Conv2d) and any(_matches(name, p) for p in self.patterns)
            ]
        return list(dict.fromkeys(names))

    def _describe_targets(self) -> str:
        return "+".join(sorted(self.preset)) if self.preset is not None else repr(list(self.patterns))

    # -- merging -----------------------------------------------------------------------------------
    @property
    def lora_layers(self) -> list[LoraLayer]:
        """The peft LoRA layers inserted into the towers."""
        return list(self._lora_layers)

    @property
    def merged(self) -> bool:
        """True while the LoRA updates are folded into the towers' weights."""
        return any(layer.merged for layer in self._lora_layers)

    def merge(self) -> None:
        """Fold every LoRA update into its frozen weight (``W <- W + s B A``): same outputs, no LoRA cost.

        While merged the LoRA weights are bypassed (they receive no gradient): merge for evaluation or
        export, and :meth:`unmerge` before training further or saving a full checkpoint.
        """
        if not self._lora_layers:
            raise RuntimeError("LoRA has not been applied to any tower yet")
        for layer in self._lora_layers:
            if not layer.merged:
                layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])

    def unmerge(self) -> None:
        """Subtract the LoRA updates from the frozen weights again (restores them to float tolerance)."""
        for layer in self._lora_layers:
            while layer.merged:
                layer.unmerge()


def parse_preset(targets: str) -> frozenset[str]:
    """The parts of a preset such as ``"qkv+out"``."""
    parts = frozenset(p.strip() for p in targets.split("+"))
    unknown = sorted(parts - set(PRESET_PARTS))
    if unknown or not parts:
        raise ValueError(
            f"unknown LoRA target preset {targets!r}: combine {', '.join(PRESET_PARTS)} with '+' "
            "(e.g. 'qkv' or 'qkv+out'), or give a list of module-name patterns"
        )
    return parts


def _preset_targets(tower: Tower, block: BlockInfo, parts: frozenset[str]) -> list[str]:
    if block.layout == "map":
        return [f"{block.name}.{n}" for n, m in block.module.named_modules() if _is_pointwise(m)]
    names: list[str] = []
    if "qkv" in parts:
        if block.qkv is None:
            raise ValueError(
                f"{type(tower).__name__} block {block.name} reports no query/key/value projections"
            )
        names += block.qkv.names
    if "out" in parts:
        if block.attention_output is None:
            raise ValueError(f"{type(tower).__name__} block {block.name} reports no attention output")
        names.append(tower.relative_name(block.attention_output))
    if "mlp" in parts:
        attention = _qkv_modules(block) | {id(block.attention_output)}
        names += [
            f"{block.name}.{n}"
            for n, m in block.module.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in attention
        ]
    return names


def _qkv_modules(block: BlockInfo) -> set[int]:
    if block.qkv is None:
        return set()
    candidates = (block.qkv.query, block.qkv.key, block.qkv.value, block.qkv.fused)
    return {id(m) for m in candidates if m is not None}


def _is_pointwise(module: nn.Module) -> bool:
    """A dense per-position channel mix: an ungrouped 1x1 convolution or a linear (ConvNeXt-style)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def _is_lora_name(name: str, prefix: str) -> bool:
    return any(part.startswith(prefix) for part in name.split("."))


def _call_fused_qkv_module(tower: Tower, name: str) -> None:
    """Make the attention that owns the fused qkv linear ``name`` call it as a module.

    timm's EVA and BEiT attentions with separate q/v biases compute ``F.linear(x, self.qkv.weight, bias)``:
    they read the weight and never call the linear, so a split (and LoRA) linear would be bypassed (and
    has no ``weight``). Their ``qkv_bias_separate`` switch computes ``self.qkv(x) + bias`` instead, the same
    function; other attentions that read the weight directly are refused.
    """
    owner = name.rpartition(".")[0]
    attention = tower.get_submodule(owner)
    if getattr(attention, "q_bias", None) is None:
        return
    if not hasattr(attention, "qkv_bias_separate"):
        raise ValueError(
            f"{type(attention).__name__} at {owner} adds separate q/v biases to its fused qkv weight "
            "without calling the qkv linear; LoRA cannot adapt its q, k and v"
        )
    attention.qkv_bias_separate = True


def _replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
