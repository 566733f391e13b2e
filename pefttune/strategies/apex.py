"""APEX: visual prompts, a text adapter and a difficulty-adaptive ensemble (Yang, Ko, Yun; EMNLP 2023)."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pefttune.data.records import normalize_caption
from pefttune.layers.frozen_batchnorm import freeze_batchnorm_statistics
from pefttune.layers.hooks import add_input_transform, add_output_transform
from pefttune.layers.linear_adapter import LinearAdapter
from pefttune.layers.prompts import (
    AppendPromptTokens,
    PixelPaddingPrompt,
    PromptMode,
    ReplacePromptTokens,
    StripPromptTokens,
    TextContext,
)
from pefttune.strategies.base import (
    AdaptationStrategy,
    DualEncoder,
    SizedImageTower,
    TemperaturePolicy,
    TextKind,
    TrainingTexts,
    unfreeze_projection,
)
from pefttune.towers.base import ImageTower, TextTower

log = logging.getLogger(__name__)

ReferencePrompts = Literal["none", "random"]

# Bahng et al. (2022) pad 30 pixels of a 224-pixel image; other sizes keep that proportion.
_PIXEL_PAD_AT_224 = 30
_ENCODE_CHUNK = 256


def ensemble_weights(
    frozen_texts: torch.Tensor, bank: torch.Tensor, beta: float = 4.0, threshold: float = 0.05
) -> torch.Tensor:
    """APEX's per-text ensemble weight on the adapted model, from frozen-model text embeddings.

    For each evaluated text c, with cosine similarities to the bank of training texts:
    ``d_nn = max(0, 1 - max cos)``, ``d_avg = 1 - mean cos`` and
    ``alpha_c = exp(-beta * d_avg * [d_nn > threshold])``: texts whose nearest training text is closer than
    the threshold count as seen (alpha = 1, the adapted model alone); the others fall back towards the
    unadapted model the further they are from the training texts on average.

    Args:
        frozen_texts: frozen-model embeddings of the evaluated texts [T, D] (normalised here).
        bank: frozen-model embeddings of the training texts [N, D] (normalised here), N >= 1.
        beta: the scale of the difficulty (APEX: 4).
        threshold: nearest-neighbour distance at or below which a text counts as seen (APEX: 0.05).

    Returns:
        alpha [T] in (0, 1].
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"the bank must hold at least one embedding [N >= 1, D], got {tuple(bank.shape)}")
    cosine = F.normalize(frozen_texts.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T
    nearest = (1.0 - cosine.max(dim=1).values).clamp_min(0.0)
    average = 1.0 - cosine.mean(dim=1)
    difficulty = average * (nearest > threshold).to(average.dtype)
    return torch.exp(-beta * difficulty)


def calibrated_threshold(bank: torch.Tensor, quantile: float = 0.95) -> float:
    """The seen-threshold of a caption bank: a quantile of its texts' distances to their nearest other text.

    APEX calls a text "seen" when its nearest training text is within 0.05 (cosine above 0.95). With
    class names that separates the training classes (distance 0) from new ones; with free captions no
    evaluated caption is a near-copy of a training caption, so nearly every in-domain caption would be
    "unseen". Measured on the bank itself, a held-out caption from the training distribution is within this
    distance of the bank with probability ``quantile`` (the leave-one-out nearest-neighbour distances of
    the training captions are the reference), so in-domain captions count as seen and only captions further
    from the training captions than the training captions are from each other fall back to the frozen model.

    Args:
        bank: frozen-model embeddings of the training texts [N, D] (normalised here), N >= 2.
        quantile: the share of training captions that must count as seen.

    Returns:
        The distance threshold, at least 0.

    Raises:
        ValueError: With fewer than two bank rows or a quantile outside (0, 1].
    """
    if bank.ndim != 2 or bank.shape[0] < 2:
        raise ValueError(
            f"calibrating the seen threshold needs at least two bank rows, got {tuple(bank.shape)}"
        )
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"seen_quantile must lie in (0, 1], got {quantile!r}")
    rows = F.normalize(bank.float(), dim=-1)
    cosine = rows @ rows.T
    cosine.fill_diagonal_(float("-inf"))
    nearest = (1.0 - cosine.max(dim=1).values).clamp_min(0.0)
    # "higher": at least `quantile` of the training captions are within the threshold.
    return float(torch.quantile(nearest, quantile, interpolation="higher"))


RetrievalEnsemble = Literal["adaptive", "text_only", "fixed", "off"]
_RETRIEVAL_ENSEMBLES: tuple[str, ...] = ("adaptive", "text_only", "fixed", "off")
# Index in the persistent buffer apex_text_bank_kind: 0 class prompts, 1 captions.
_BANK_KINDS: tuple[TextKind, ...] = ("class_prompts", "captions")


class APEX(AdaptationStrategy):
    """APEX: deep visual prompts, learnable text context, a linear text adapter and an adaptive ensemble.

    Yang, Ko, Yun, "Towards Difficulty-Agnostic Efficient Transfer Learning for Vision-Language Models",
    EMNLP 2023 (arXiv 2311.15569; v1 "Improving Adaptability and Generalizability of Efficient Transfer
    Learning for VLMs"). Details follow the official code as summarised in ``docs/methods/apex.md``.

    What trains (everything else is frozen, the temperature included):

    * **Deep visual prompts**: ``visual_prompt_tokens`` (2) tokens N(0, ``prompt_init_std`` = 0.02)
      appended after the patch tokens at the image tower's token entry, and replaced by fresh tokens
      before every block up to ``visual_prompt_depth`` (12; clipped to the tower's depth). After the last
      block the prompt tokens are dropped, so pooling sees the original sequence.
    * **Text context**: ``text_context_length`` (2) vectors at the input of the text tower, initialised from
      the token embeddings of ``text_context_init`` ("a photo"). The tokenizer inserts placeholder ids
      for them after the start token; in class prompts "a photo of a {class}." they play the words
      "a photo" (templates are tokenized without them: :meth:`strip_prompt_prefix`), with free captions
      they are extra context after the start token.
    * **Text adapter**: one ``d x d`` linear on the projected text embedding, initialised to the identity
      with zero bias.

    On CLIP ViT-B/16 that is 2 x 512 + 12 x 2 x 768 + 512 x 512 + 512 = 282,112 parameters.

    Training is plain contrastive learning through the adapted towers with the checkpoint's frozen logit
    scale, without the ensemble. The default loss is InfoNCE (retrieval). APEX itself trains image-to-text
    cross-entropy over the prompts of *all* training classes; the classification configs use
    :class:`~pefttune.losses.MultiPositiveInfoNCELoss` instead, its in-batch, symmetric counterpart (only
    the classes present in the batch are negatives; images of one class share their prompt as positives;
    plain InfoNCE would make them each other's negatives). The paper's recipe
    (Adadelta lr 0.15, weight decay 1e-3, batch 16, 15 epochs, one warm-up epoch at 1e-2, cosine) is in
    ``configs/paper/apex_clip_vitb16.yaml``.

    **Adaptive ensemble** (evaluation only, ``ensemble=True``): the frozen model's text embeddings of the
    training texts (class prompts, or a seeded sample of up to ``bank_size`` training captions) are kept
    in the persistent buffers ``apex_text_bank`` ([bank_size, D], the first ``apex_text_bank_rows`` rows
    filled), so they are in every checkpoint, adapter-only ones included. The bank is built when fitting
    starts. Each evaluated text c gets ``alpha_c`` (:func:`ensemble_weights`, ``beta`` 4,
    ``threshold`` 0.05). Text features are ``alpha_c * adapted + (1 - alpha_c) * unadapted`` where
    "unadapted" is the prompted text feature without the adapter (the adapter's input); image features are
    ``mean(alpha) * prompted + (1 - mean(alpha)) * frozen`` over all evaluated texts; mixing happens before
    normalisation. The frozen image reference is the tower without prompts
    (``reference_prompts="none"``) or, as in the official code, with a second set of random, never-trained
    prompts (``"random"``, kept as buffers so checkpoints reproduce it).

    Deviations and choices:

    * **Convolutional image towers** (no tokens, ``token_entry is None``): deep token prompts do not exist,
      so a learnable pixel-space padding prompt (Bahng et al., 2022) is added around the input image
      instead: a border of ``pixel_prompt_pad`` pixels (default: 30 at 224 px, scaled to the tower's
      image size), N(0, ``prompt_init_std``) rather than Bahng's N(0, 1), ``3 * (2 p S + 2 p (S - 2p))``
      parameters (69,840 at S = 224, p = 30). The frozen backbone's BatchNorm layers always normalise
      with their pretrained statistics (run in eval mode), so "frozen" holds for their buffers too.
    * **Retrieval** (``retrieval_ensemble``, used when the bank holds training captions rather than class
      prompts): alpha is computed per caption from its content, so it does not depend on how texts are
      batched. ``adaptive`` (default) takes the seen-threshold from the training captions themselves
      (:func:`calibrated_threshold`: the ``seen_quantile`` quantile of their leave-one-out nearest-neighbour
      distances), because APEX's fixed 0.05 makes nearly every in-domain caption "unseen" and the evaluated
      model mostly the unadapted one; ``text_only`` does the same on the text side and leaves the images
      to the prompted model (no image-side mean); ``fixed`` keeps the class-name rule (threshold
      ``ensemble_threshold``) for comparison; ``off`` evaluates the adapted model alone (a suite's
      ``apex_no_ensemble`` row). ``docs/methods/apex.md`` gives the reasoning.
    * **Difficulty space**: alpha compares frozen projected text embeddings (CLIP's frozen projection).
      With ``train_projections=True`` (new random heads, e.g. the offline default towers) the projection
      is no longer frozen, so the comparison uses the frozen backbone's pooled text features instead.
    * Text context placeholders: with ``text_context_init=None`` the context starts from N(0, 0.02) and the
      placeholders are the token "X" (as CoOp); without any tokenizer (architecture-only towers) the
      context starts from N(0, 0.02) as well.

    Args:
        visual_prompt_tokens: prompt tokens per layer (APEX: 2).
        visual_prompt_depth: layers with their own prompts, from the input (APEX: 12; cross-dataset: 3).
        prompt_init_std: standard deviation of the prompts' normal initialisation.
        pixel_prompt_pad: border width of the pixel prompt on convolutional towers; None scales 30 px at
            224 px to the tower's image size.
        text_context_init: words whose embeddings initialise the text context (and whose token ids are the
            placeholders); None for a random start.
        text_context_length: number of text context vectors; must equal the token count of
            ``text_context_init``.
        train_projections: also train both towers' projection heads (for towers whose heads are new and
            random; APEX on CLIP keeps them frozen).
        ensemble: use the adaptive ensemble at evaluation (False: the adapted model alone).
        ensemble_beta: beta of ``alpha = exp(-beta * difficulty)``.
        ensemble_threshold: nearest-neighbour distance at or below which a text counts as seen.
        retrieval_ensemble: the ensemble with a caption bank (retrieval): ``adaptive``, ``text_only``,
            ``fixed`` or ``off`` (see above); class-prompt banks always use APEX's own rule.
        seen_quantile: share of training captions that count as seen under the calibrated threshold.
        bank_size: at most this many training texts in the bank (a seeded sample when there are more).
        bank_seed: seed of that sample.
        reference_prompts: the frozen image reference: ``none`` (plain frozen tower) or ``random`` (the
            official code's random untrained prompts).
        **kwargs: see :class:`~pefttune.strategies.base.AdaptationStrategy`.
    """

    prefix: ClassVar[str] = "apex_"
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy(init=None, learnable=False)
    # Evaluation-only options (the ensemble) and initialisation may differ from an adapter checkpoint's.
    init_only_arguments: ClassVar[tuple[str, ...]] = (
        "prompt_init_std",
        "ensemble",
        "ensemble_beta",
        "ensemble_threshold",
        "retrieval_ensemble",
        "seen_quantile",
        "bank_seed",
    )
    uses_training_texts: ClassVar[bool] = True

    def __init__(
        self,
        visual_prompt_tokens: int = 2,
        visual_prompt_depth: int = 12,
        prompt_init_std: float = 0.02,
        pixel_prompt_pad: int | None = None,
        text_context_init: str | None = "a photo",
        text_context_length: int = 2,
        train_projections: bool = False,
        ensemble: bool = True,
        ensemble_beta: float = 4.0,
        ensemble_threshold: float = 0.05,
        retrieval_ensemble: RetrievalEnsemble = "adaptive",
        seen_quantile: float = 0.95,
        bank_size: int = 1024,
        bank_seed: int = 0,
        reference_prompts: ReferencePrompts = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if visual_prompt_tokens < 1 or visual_prompt_depth < 1:
            raise ValueError("visual_prompt_tokens and visual_prompt_depth must be >= 1")
        if text_context_length < 1:
            raise ValueError(f"text_context_length must be >= 1, got {text_context_length}")
        if bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {bank_size}")
        if reference_prompts not in ("none", "random"):
            raise ValueError(f"reference_prompts must be 'none' or 'random', got {reference_prompts!r}")
        if retrieval_ensemble not in _RETRIEVAL_ENSEMBLES:
            raise ValueError(
                f"retrieval_ensemble must be one of {_RETRIEVAL_ENSEMBLES}, got {retrieval_ensemble!r}"
            )
        if not 0.0 < seen_quantile <= 1.0:
            raise ValueError(f"seen_quantile must lie in (0, 1], got {seen_quantile!r}")
        self.visual_prompt_tokens = visual_prompt_tokens
        self.visual_prompt_depth = visual_prompt_depth
        self.prompt_init_std = prompt_init_std
        self.pixel_prompt_pad = pixel_prompt_pad
        self.text_context_init = text_context_init
        self.text_context_length = text_context_length
        self.train_projections = train_projections
        self.ensemble = ensemble
        self.ensemble_beta = ensemble_beta
        self.ensemble_threshold = ensemble_threshold
        self.retrieval_ensemble: RetrievalEnsemble = retrieval_ensemble
        self.seen_quantile = seen_quantile
        self.bank_size = bank_size
        self.bank_seed = bank_seed
        self.reference_prompts = reference_prompts
        # Frozen-model text embeddings, [bank_size, D] once adapted (D is known then), of which the first
        # `apex_text_bank_rows` are filled when fitting starts. A fixed shape lets any checkpoint of the
        # same config load into a freshly built model, adapter-only ones included.
        self.register_buffer("apex_text_bank", torch.zeros(0, 0), persistent=True)
        self.register_buffer("apex_text_bank_rows", torch.tensor(0), persistent=True)
        # What the bank holds: 0 class prompts (APEX's own rule applies), 1 training captions (retrieval).
        self.register_buffer("apex_text_bank_kind", torch.tensor(0), persistent=True)
        # Plain lists: the modules live in the towers, registering them here would duplicate their weights.
        self._visual_modules: list[nn.Module] = []
        self._context_modules: list[TextContext] = []
        self._adapter_modules: list[LinearAdapter] = []
        self._image_alpha: float | None = None
        self._alpha_cache: dict[tuple[int, ...], float] = {}
        self._threshold: float | None = None
        self._warned: set[str] = set()

    # -- building ----------------------------------------------------------------------------------
    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Attach visual prompts, text context and the text adapter; freeze everything else."""
        self._attach_visual_prompts(image_tower)
        self._attach_text_context(text_tower)
        adapter = LinearAdapter(text_tower.embed_dim)
        add_output_transform(text_tower.projection, "apex_adapter", adapter)
        self._adapter_modules = [adapter]
        if self.train_projections:
            unfreeze_projection(image_tower)
            unfreeze_projection(text_tower)
        for tower in (image_tower, text_tower):
            freeze_batchnorm_statistics(tower.model)
        width = text_tower.feature_width if self.train_projections else text_tower.embed_dim
        self.apex_text_bank = torch.zeros(self.bank_size, width)

    def _attach_visual_prompts(self, tower: ImageTower) -> None:
        reference = self.reference_prompts == "random"
        entry = tower.token_entry
        if entry is None:
            if not isinstance(tower, SizedImageTower):
                raise ValueError(
                    f"{type(tower).__name__} has no token entry and no image_size: APEX's pixel padding "
                    "prompt needs the input size"
                )
            size = tower.image_size
            pad = self.pixel_prompt_pad
            if pad is None:
                pad = max(1, round(_PIXEL_PAD_AT_224 * int(size) / 224))
            prompt = PixelPaddingPrompt(int(size), pad, self.prompt_init_std, reference)
            add_input_transform(tower.model, "apex_pixel_prompt", prompt)
            self._visual_modules = [prompt]
            return
        blocks = tower.blocks()
        if any(block.layout != "tokens" for block in blocks):
            raise ValueError(f"{type(tower).__name__} has a token entry but blocks that are not token blocks")
        n, width, std = self.visual_prompt_tokens, blocks[0].width, self.prompt_init_std
        depth = min(self.visual_prompt_depth, len(blocks))
        if depth < self.visual_prompt_depth:
            log.info("APEX: the image tower has %d blocks; visual prompts in all of them", len(blocks))
        first = AppendPromptTokens(n, width, std, reference)
        add_output_transform(entry, "apex_prompts", first)
        modules: list[nn.Module] = [first]
        for block in blocks[1:depth]:
            replace = ReplacePromptTokens(n, width, std, reference)
            add_input_transform(block.module, "apex_prompts", replace)
            modules.append(replace)
        strip = StripPromptTokens(n, reference)
        add_output_transform(blocks[-1].module, "apex_strip_prompts", strip)
        modules.append(strip)
        self._visual_modules = modules

    def _attach_text_context(self, tower: TextTower) -> None:
        entry = tower.token_entry
        if entry is None:
            raise ValueError(f"{type(tower).__name__} has no token entry for APEX's text context")
        n = self.text_context_length
        ids, vectors = self._context_initialisation(tower, entry, n)
        tower.set_prompt_slots(ids)
        context = TextContext(vectors)
        add_output_transform(entry, "apex_context", context)
        self._context_modules = [context]

    def _context_initialisation(
        self, tower: TextTower, entry: nn.Module, n: int
    ) -> tuple[list[int], torch.Tensor]:
        """Placeholder ids and initial vectors of the text context."""
        try:
            tokenizer = tower.tokenizer
        except (OSError, ImportError, ValueError) as error:
            log.warning(
                "APEX: no tokenizer (%s); text context starts from N(0, %g)", error, self.prompt_init_std
            )
            tokenizer = None
        with torch.no_grad():
            width = int(entry(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
        random_vectors = torch.randn(n, width) * self.prompt_init_std
        if tokenizer is None:
            return [0] * n, random_vectors
        vocabulary = _num_embeddings(entry)
        if self.text_context_init is not None:
            ids = list(tokenizer(self.text_context_init, add_special_tokens=False)["input_ids"])
            if len(ids) != n:
                raise ValueError(
                    f"text_context_init {self.text_context_init!r} is {len(ids)} tokens for this tokenizer, "
                    f"but text_context_length is {n}"
                )
            if vocabulary is None or max(ids) < vocabulary:
                with torch.no_grad():
                    vectors = entry(torch.tensor([ids])).squeeze(0).float()
                return ids, vectors
            log.warning("APEX: the tokenizer's ids exceed the embedding table; text context starts at random")
            return [0] * n, random_vectors
        placeholder = list(tokenizer("X", add_special_tokens=False)["input_ids"])[:1] or [0]
        if vocabulary is not None and placeholder[0] >= vocabulary:
            placeholder = [0]
        return placeholder * n, random_vectors

    # -- switching the method's modules -----------------------------------------------------------
    @contextlib.contextmanager
    def components(
        self, visual: PromptMode = "learned", text_context: bool = True, text_adapter: bool = True
    ) -> Iterator[None]:
        """Temporarily switch the method's modules in both towers.

        Args:
            visual: ``learned`` (trained prompts), ``off`` (the frozen image tower) or ``reference`` (random
                untrained prompts; only with ``reference_prompts="random"``).
            text_context: use the learned text context (False: the placeholder words' own embeddings).
            text_adapter: apply the text adapter (False: the projected text feature as it is).
        """
        saved = (
            [m.mode for m in self._visual_modules],
            [m.mode for m in self._context_modules],
            [m.enabled for m in self._adapter_modules],
        )
        try:
            for module in self._visual_modules:
                module.mode = visual
            for module in self._context_modules:
                module.mode = "learned" if text_context else "off"
            for module in self._adapter_modules:
                module.enabled = text_adapter
            yield
        finally:
            for module, mode in zip(self._visual_modules, saved[0], strict=True):
                module.mode = mode
            for module, mode in zip(self._context_modules, saved[1], strict=True):
                module.mode = mode
            for module, enabled in zip(self._adapter_modules, saved[2], strict=True):
                module.enabled = enabled

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """Run the towers as the frozen model: no prompts, no text context, no adapter."""
        return self.components(visual="off", text_context=False, text_adapter=False)

    @property
    def text_adapter(self) -> LinearAdapter:
        """The text adapter (after :meth:`adapt`)."""
        if not self._adapter_modules:
            raise RuntimeError("APEX has not been applied to towers yet")
        return self._adapter_modules[0]

    # -- text prompts for zero-shot classification ------------------------------------------------
    @property
    def text_prompt_prefix(self) -> str:
        """The words the text context plays ("a photo"): class-prompt templates are tokenized without them."""
        return self.text_context_init or ""

    def strip_prompt_prefix(self, text: str) -> str:
        """``text`` without a leading :attr:`text_prompt_prefix` (case-insensitive, whole words).

        "a photo of a {}." becomes "of a {}.", so the tokenizer's context slots take the place of "a photo".
        Texts that do not start with the prefix are returned unchanged.
        """
        prefix = self.text_prompt_prefix
        stripped = text.lstrip()
        if not prefix or not stripped.lower().startswith(prefix.lower()):
            return text
        rest = stripped[len(prefix) :]
        if rest and not rest[0].isspace():
            return text
        return rest.lstrip()

    # -- the bank of training texts ---------------------------------------------------------------
    @property
    def bank(self) -> torch.Tensor:
        """Frozen-model embeddings of the training texts [N, D] (N = 0 before fitting)."""
        return self.apex_text_bank[: int(self.apex_text_bank_rows)]

    def on_fit_start(self, module: DualEncoder, training_texts: TrainingTexts) -> None:
        """Build the bank from the training texts (kept when a checkpoint brought one)."""
        if self.bank.shape[0] > 0:
            log.info("APEX: keeping the text bank of %d embeddings", self.bank.shape[0])
            return
        texts = list(training_texts)
        if not texts:
            log.warning("APEX: no training texts found; the ensemble will use the adapted model alone")
            return
        self.build_bank(module, texts, kind=training_texts.kind)

    def build_bank(
        self, module: DualEncoder, texts: Sequence[str], kind: TextKind = "class_prompts"
    ) -> torch.Tensor:
        """Encode (a seeded sample of at most ``bank_size`` of) the distinct ``texts`` with the frozen model.

        Args:
            module: the model whose towers encode the texts.
            texts: training texts (captions or class prompts), tokenized as training tokenizes them.
            kind: ``class_prompts`` (APEX's rule) or ``captions`` (free captions: the ``retrieval_ensemble``
                rule).

        Returns:
            The new bank [N, D], also stored in ``apex_text_bank``.
        """
        # Texts equal up to case and spacing count once (the data module's notion of the same caption).
        first: dict[str, str] = {}
        for text in texts:
            if text.strip():
                first.setdefault(normalize_caption(text), text)
        distinct = list(first.values())
        if not distinct:
            raise ValueError("APEX.build_bank needs at least one non-empty text")
        if kind not in _BANK_KINDS:
            raise ValueError(f"kind must be one of {_BANK_KINDS}, got {kind!r}")
        if len(distinct) > self.bank_size:
            chosen = sorted(random.Random(self.bank_seed).sample(range(len(distinct)), self.bank_size))
            distinct = [distinct[i] for i in chosen]
        with _evaluation_mode(module.text_tower), torch.no_grad():
            rows = [
                self.frozen_text_embeddings(module, **self._tokenize(module, distinct[i : i + _ENCODE_CHUNK]))
                for i in range(0, len(distinct), _ENCODE_CHUNK)
            ]
        bank = torch.cat(rows)
        if bank.shape[1] != self.apex_text_bank.shape[1]:
            raise ValueError(f"bank rows are {bank.shape[1]} wide, the buffer {self.apex_text_bank.shape[1]}")
        current = self.apex_text_bank
        if current.shape[0] != self.bank_size:  # a loaded checkpoint brought another size
            self.apex_text_bank = torch.zeros(
                self.bank_size, bank.shape[1], dtype=current.dtype, device=current.device
            )
        with torch.no_grad():
            self.apex_text_bank.zero_()
            self.apex_text_bank[: bank.shape[0]] = bank.to(self.apex_text_bank)
            self.apex_text_bank_rows.fill_(bank.shape[0])
            self.apex_text_bank_kind.fill_(_BANK_KINDS.index(kind))
        self._alpha_cache = {}
        self._threshold = None
        log.info("APEX: text bank of %d frozen text embeddings (%s)", bank.shape[0], kind)
        return self.bank

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint made with another bank_size still loads: take the saved bank's shape.
        incoming = state_dict.get(prefix + "apex_text_bank")
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.apex_text_bank.shape:
            current = self.apex_text_bank
            self.apex_text_bank = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        kind_key = prefix + "apex_text_bank_kind"
        if isinstance(incoming, torch.Tensor) and kind_key not in state_dict:
            # Checkpoints from before the bank recorded its kind: class prompts, APEX's rule, as then.
            log.warning("APEX: the checkpoint does not say what its text bank holds; assuming class prompts")
            state_dict[kind_key] = torch.tensor(0)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._alpha_cache = {}
        self._threshold = None

    # -- frozen features and ensemble weights ------------------------------------------------------
    def frozen_text_embeddings(
        self, module: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised frozen-model text embeddings [T, D], in the space of the bank.

        The frozen model sees the placeholder words ("a photo") in the context slots. With trained
        projections the comparison space is the frozen backbone's pooled features.
        """
        tower = module.text_tower
        with self.frozen():
            if self.train_projections:
                features = tower.features(input_ids, attention_mask)
            else:
                features = tower(input_ids, attention_mask)
        return F.normalize(features.float(), dim=-1)

    def text_alpha(
        self, module: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The ensemble weight of each text [T] (1 without a bank)."""
        rows = input_ids.shape[0]
        bank = self.bank
        if bank.shape[0] == 0:
            self._warn_once("bank", "APEX: empty text bank (no fit yet?); evaluating the adapted model alone")
            return torch.ones(rows, device=input_ids.device)
        keys = _text_keys(input_ids, attention_mask)
        if all(key in self._alpha_cache for key in keys):
            return torch.tensor([self._alpha_cache[key] for key in keys], device=input_ids.device)
        frozen = self.frozen_text_embeddings(module, input_ids, attention_mask)
        if bank.shape[1] != frozen.shape[1]:
            raise ValueError(
                f"APEX's text bank holds {bank.shape[1]}-wide embeddings but the frozen texts are "
                f"{frozen.shape[1]} wide: was the checkpoint trained with another train_projections?"
            )
        alpha = ensemble_weights(frozen, bank.to(frozen.device), self.ensemble_beta, self.seen_threshold)
        self._alpha_cache.update(zip(keys, alpha.tolist(), strict=True))
        return alpha

    # -- evaluation hooks --------------------------------------------------------------------------
    @property
    def bank_kind(self) -> TextKind:
        """What the bank holds: ``class_prompts`` or ``captions`` (retrieval training captions)."""
        return _BANK_KINDS[int(self.apex_text_bank_kind)]

    @property
    def retrieval_mode(self) -> RetrievalEnsemble | None:
        """The ``retrieval_ensemble`` rule in force: None with a class-prompt bank (APEX's own rule)."""
        return self.retrieval_ensemble if self.bank_kind == "captions" else None

    @property
    def ensemble_active(self) -> bool:
        """Whether evaluation mixes the adapted and the frozen model."""
        return self.ensemble and self.retrieval_mode != "off"

    @property
    def seen_threshold(self) -> float:
        """The nearest-neighbour distance at or below which an evaluated text counts as seen.

        ``ensemble_threshold`` for class prompts and under ``retrieval_ensemble="fixed"``; otherwise
        calibrated on the caption bank (:func:`calibrated_threshold`), once per bank.
        """
        if self.retrieval_mode not in ("adaptive", "text_only"):
            return self.ensemble_threshold
        if self._threshold is None:
            bank = self.bank
            if bank.shape[0] < 2:
                self._warn_once(
                    "calibrate", "APEX: a one-caption bank cannot calibrate; fixed threshold used"
                )
                self._threshold = self.ensemble_threshold
            else:
                self._threshold = calibrated_threshold(bank, self.seen_quantile)
        return self._threshold

    def on_evaluation_start(self, module: DualEncoder, texts: Sequence[str]) -> None:
        """Compute every evaluated text's weight and their mean, the image-side weight."""
        self._alpha_cache = {}
        self._image_alpha = None
        if not self.ensemble_active:
            return
        if self.bank.shape[0] == 0:
            self._warn_once("bank", "APEX: empty text bank (no fit yet?); evaluating the adapted model alone")
            self._image_alpha = 1.0
            return
        texts = list(texts)
        if not texts:
            self._warn_once(
                "texts", "APEX: the evaluated texts are unknown; the image side uses the prompted model alone"
            )
            self._image_alpha = 1.0
            return
        alphas = []
        with torch.no_grad():
            for start in range(0, len(texts), _ENCODE_CHUNK):
                batch = self._tokenize(module, texts[start : start + _ENCODE_CHUNK])
                alphas.append(self.text_alpha(module, **batch))
        alpha = torch.cat(alphas)
        # text_only: the per-text weights stay, the images are the prompted model's.
        self._image_alpha = 1.0 if self.retrieval_mode == "text_only" else float(alpha.mean())
        log.info(
            "APEX ensemble (%s): %d texts, seen threshold %.4f, mean alpha %.4f, %d seen (alpha = 1), "
            "image-side weight %.4f",
            self.retrieval_mode or "class prompts",
            len(texts),
            self.seen_threshold,
            float(alpha.mean()),
            int((alpha >= 1.0).sum()),
            self._image_alpha,
        )

    def evaluation_image_embeddings(
        self, module: DualEncoder, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mean(alpha) * prompted + (1 - mean(alpha)) * frozen``, then normalised (videos: per video)."""
        if not self.ensemble_active:
            return super().evaluation_image_embeddings(module, pixel_values, frame_mask)
        alpha = self._image_alpha
        if alpha is None:
            self._warn_once("start", "APEX: on_evaluation_start was not called; no image-side ensemble")
            alpha = 1.0
        prompted = module.embed_images(pixel_values, frame_mask)
        if alpha >= 1.0:
            return F.normalize(prompted, dim=-1)
        reference: PromptMode = "reference" if self.reference_prompts == "random" else "off"
        with self.components(visual=reference):
            frozen = module.embed_images(pixel_values, frame_mask)
        return F.normalize(alpha * prompted + (1.0 - alpha) * frozen, dim=-1)

    def evaluation_text_embeddings(
        self, module: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``alpha_c * adapted + (1 - alpha_c) * unadapted`` per text, then normalised."""
        if not self.ensemble_active:
            return super().evaluation_text_embeddings(module, input_ids, attention_mask)
        alpha = self.text_alpha(module, input_ids, attention_mask)
        with self.components(text_adapter=False):
            unadapted = module.text_tower(input_ids, attention_mask)
        adapted = self.text_adapter.adapt(unadapted)
        weight = alpha.to(device=unadapted.device, dtype=unadapted.dtype).unsqueeze(1)
        return F.normalize(weight * adapted + (1.0 - weight) * unadapted, dim=-1)

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _tokenize(module: DualEncoder, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = module.text_tower.tokenize(list(texts))
        device = next(module.text_tower.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _text_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, ...]]:
    """A key per text: its attended token ids (independent of padding and batching)."""
    mask = attention_mask.bool()
    return [tuple(ids[row].tolist()) for ids, row in zip(input_ids, mask, strict=True)]


def _num_embeddings(entry: nn.Module) -> int | None:
    weight = getattr(entry, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode
