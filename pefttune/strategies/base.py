"""The base class of every adaptation method."""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from pefttune.towers.base import ImageTower, TextTower, Tower

if TYPE_CHECKING:
    from pefttune.losses import ContrastiveLoss

PARAMETER_GROUPS = ("method", "backbone", "head", "temperature")
#: The base class's own constructor arguments: how the method trains, never what its tensors compute.
BASE_ARGUMENTS = ("temperature", "group_lr", "no_decay_norms_and_biases")
TEMPERATURE_NAMES = ("logit_scale", "logit_bias")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


@runtime_checkable
class DualEncoder(Protocol):
    """What a strategy's hooks receive of the model: its two towers and their plain embeddings.

    :class:`~pefttune.module.DualEncoderModule` is one; so is any object with these members (a test double,
    an exported model). Hooks never get the LightningModule's trainer, logger or data module: what they need
    from the data arrives as an argument (``training_texts``, the evaluated ``texts``).
    """

    @property
    def image_tower(self) -> ImageTower:
        """The (adapted) image tower."""
        ...

    @property
    def text_tower(self) -> TextTower:
        """The (adapted) text tower."""
        ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] through the adapted towers."""
        ...

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [T, D] through the adapted towers."""
        ...


TextKind = Literal["captions", "class_prompts"]


@dataclass(frozen=True)
class TrainingTexts:
    """Every text training draws from, and what they are (a sequence of the texts).

    Attributes:
        texts: the texts, as training tokenizes them.
        kind: ``captions`` (free captions of image-text data) or ``class_prompts`` (the prompts of the
            training classes of a zero-shot classification data module). APEX's ensemble rule differs.
    """

    texts: tuple[str, ...] = ()
    kind: TextKind = "captions"

    def __post_init__(self) -> None:
        if self.kind not in ("captions", "class_prompts"):
            raise ValueError(f"kind must be 'captions' or 'class_prompts', got {self.kind!r}")
        object.__setattr__(self, "texts", tuple(str(text) for text in self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


@runtime_checkable
class SizedImageTower(Protocol):
    """An image tower that declares its square input resolution (``image_size`` pixels).

    Every built-in image tower does; a method that works in pixel space (APEX's padding prompt on
    convolutional towers) asks for it through this Protocol.
    """

    image_size: int


@dataclass
class TemperaturePolicy:
    """How the logit scale (1 / temperature) behaves.

    Attributes:
        init: initial scale; ``None`` takes the towers' pretrained scale (CLIP checkpoints), else 1/0.07.
        learnable: whether the scale trains (as ``log`` scale, like CLIP).
        max_scale: clamp of a learnable scale after every optimizer step (CLIP: 100); ``None``: no clamp.
    """

    init: float | None = None
    learnable: bool = True
    max_scale: float | None = 100.0

    def initial_scale(self, pretrained_scale: float | None) -> float:
        """The scale to start from."""
        if self.init is not None:
            return float(self.init)
        return float(pretrained_scale) if pretrained_scale is not None else 1.0 / 0.07


class AdaptationStrategy(nn.Module, abc.ABC):
    """How a method changes the towers, which parameters train and how they are optimised.

    A strategy acts once, when the model is built (:meth:`attach`). During training nothing asks which
    strategy is running: the modules it inserted run inside the towers.

    A subclass overrides:

    * ``prefix`` (class attribute): a unique name prefix carried by every parameter and buffer the method
      adds (``duet_``, ``cma_``, ``lora_``, ``apex_``). Adapter-only checkpoints filter by it.
    * :meth:`adapt` (required): insert modules (see :mod:`pefttune.layers.hooks`), then set
      ``requires_grad`` on what trains. Everything starts frozen.
    * ``default_temperature`` (class attribute, a :class:`TemperaturePolicy`); users may override it with
      the ``temperature`` argument.
    * :meth:`default_loss` (optional): the method's loss when the config names none (InfoNCE by default).
    * ``init_only_arguments`` (class attribute): constructor arguments that only shape initialisation,
      training or evaluation, which an adapter-only checkpoint need not match (see
      :meth:`checkpoint_arguments`).

    And, rarely:

    * :meth:`on_fit_start`: work that needs the training data (APEX builds its text bank from the training
      texts, which it asks for with ``uses_training_texts = True``).
    * :meth:`on_evaluation_start`, :meth:`evaluation_image_embeddings`, :meth:`evaluation_text_embeddings`:
      a different encoding at evaluation (APEX's ensemble).
    * :meth:`merge` / :meth:`unmerge` (and :attr:`merged`): fold the method into the backbone weights (LoRA).
    * :meth:`checkpoint_arguments`: only when a constructor argument is not kept as an attribute of its name.

    Hooks receive a :class:`DualEncoder` (the towers and their encoders), never the trainer. Each constructor
    argument is stored under its own name (``self.width = width``). Built-in methods are also registered
    in :mod:`pefttune.strategies.registry`.

    Args:
        temperature: overrides the method's default temperature policy.
        group_lr: absolute learning rates per parameter group (``method``, ``backbone``, ``head``,
            ``temperature``); groups not named use the optimizer's learning rate.
        no_decay_norms_and_biases: exclude biases, norm gains, scalars and the temperature from weight decay.
    """

    prefix: ClassVar[str] = ""
    default_temperature: ClassVar[TemperaturePolicy] = TemperaturePolicy()
    # Words a learned input-level text context plays (APEX: "a photo"); class prompts drop them.
    text_prompt_prefix: ClassVar[str] = ""
    #: Constructor arguments left out of :meth:`checkpoint_arguments`: they change how the method starts,
    #: trains or evaluates, not which tensors it holds nor what they compute, so a checkpoint may be loaded
    #: into a model built with other values of them. The base class's own arguments are always left out.
    init_only_arguments: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`on_fit_start` needs the training texts (the model then lists them from the data).
    uses_training_texts: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = vars(cls).get("on_fit_start")
        if hook is not None and "trainer" in inspect.signature(hook).parameters:
            # The hook used to take (module, trainer): an old override would silently get texts as a trainer.
            raise TypeError(
                f"{cls.__qualname__}.on_fit_start takes a trainer: the hook is now "
                "on_fit_start(self, encoder, training_texts) (set uses_training_texts = True to receive them)"
            )

    def __init__(
        self,
        temperature: TemperaturePolicy | None = None,
        group_lr: dict[str, float] | None = None,
        no_decay_norms_and_biases: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature or TemperaturePolicy(**vars(self.default_temperature))
        unknown = set(group_lr or {}) - set(PARAMETER_GROUPS)
        if unknown:
            raise ValueError(f"group_lr names unknown groups {sorted(unknown)}; expected {PARAMETER_GROUPS}")
        self.group_lr = dict(group_lr or {})
        self.no_decay_norms_and_biases = no_decay_norms_and_biases
        self._attached = False

    # -- what subclasses override ------------------------------------------------------------------
    @abc.abstractmethod
    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Insert the method's modules into the towers and unfreeze what trains.

        Called once by :meth:`attach`, with every tower parameter already frozen.
        """

    def default_loss(self) -> ContrastiveLoss:
        """The loss this method trains with when the config names none: symmetric InfoNCE."""
        from pefttune.losses import InfoNCELoss

        return InfoNCELoss()

    def on_fit_start(self, encoder: DualEncoder, training_texts: TrainingTexts) -> None:
        """Called when fitting starts, after the towers are on their device.

        Args:
            encoder: the model's towers and encoders.
            training_texts: every text training draws from (captions or class prompts, see ``kind``) when
                the class sets ``uses_training_texts``; otherwise empty, so that other methods pay nothing
                for listing them.
        """

    def on_evaluation_start(self, encoder: DualEncoder, texts: Sequence[str]) -> None:
        """Called before each evaluation epoch with every text it will encode.

        ``texts`` are the captions of the evaluated split (retrieval) or the class prompts (zero-shot
        classification). Methods whose evaluation depends on the whole set (APEX's image-side ensemble
        weight, the mean over texts) prepare it here.
        """

    def evaluation_image_embeddings(self, encoder: DualEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings at evaluation (the plain towers by default)."""
        return encoder.encode_images(pixel_values)

    def evaluation_text_embeddings(
        self, encoder: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised text embeddings at evaluation (the plain towers by default)."""
        return encoder.encode_texts(input_ids, attention_mask)

    @property
    def merged(self) -> bool:
        """True while the method's weights are folded into the backbone (see :meth:`merge`)."""
        return False

    def checkpoint_arguments(self) -> dict[str, Any]:
        """The constructor arguments an adapter-only checkpoint records and must match when loaded.

        By default every argument of the strategy's ``__init__`` (following ``**kwargs`` up through parent
        strategies that forward them) except :data:`BASE_ARGUMENTS` and ``init_only_arguments``, read back
        from the attribute of the same name, as scikit-learn's ``get_params`` does: store each constructor
        argument as ``self.<name>``. Values are plain (lists, dicts, scalars; anything else as its
        ``repr``), ready for JSON. Override this method when an argument is not kept under its own name.

        Raises:
            TypeError: when a recorded argument has no attribute of its name.
        """
        legacy = vars(self).get("init_args")
        if isinstance(legacy, dict):
            # Strategies written before this method kept a hand-written ``init_args`` dict.
            warnings.warn(
                f"{type(self).__name__}.init_args is deprecated: adapter checkpoints now record "
                "AdaptationStrategy.checkpoint_arguments() (store each constructor argument as an attribute "
                "of its name, list initialisation-only ones in init_only_arguments, and drop init_args)",
                DeprecationWarning,
                stacklevel=2,
            )
            return {str(k): plain_value(v) for k, v in legacy.items()}
        skipped = set(BASE_ARGUMENTS) | set(self.init_only_arguments)
        arguments: dict[str, Any] = {}
        missing = object()
        for name in constructor_arguments(type(self)):
            if name in skipped:
                continue
            value = getattr(self, name, missing)
            if value is missing:
                raise TypeError(
                    f"{type(self).__name__}.__init__ takes {name!r} but the strategy has no attribute "
                    f"{name!r}: store the argument as self.{name}, list it in init_only_arguments, or "
                    "override checkpoint_arguments()"
                )
            arguments[name] = plain_value(value)
        return arguments

    def merge(self) -> None:
        """Fold the method's weights into the backbone (only methods that can, such as LoRA)."""
        raise TypeError(f"{type(self).__name__} cannot merge its weights into the backbone")

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        raise TypeError(f"{type(self).__name__} cannot merge its weights into the backbone")

    # -- shared behaviour --------------------------------------------------------------------------
    def attach(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        """Freeze both towers, then let the method adapt them. Called once, when the model is built."""
        if self._attached:
            raise RuntimeError(f"{type(self).__name__} was already attached to a model")
        if self.prefix and not self.prefix.endswith("_"):
            raise ValueError(f"{type(self).__name__}.prefix must end with '_' (got {self.prefix!r})")
        image_tower.requires_grad_(False)
        text_tower.requires_grad_(False)
        self.adapt(image_tower, text_tower)
        self._attached = True

    def apply(  # type: ignore[override]
        self, fn: Callable[[nn.Module], None] | ImageTower, text_tower: TextTower | None = None
    ) -> AdaptationStrategy:
        """:meth:`torch.nn.Module.apply`: call ``fn`` on every submodule, then on the strategy.

        ``apply(image_tower, text_tower)``, the old name of :meth:`attach`, still attaches, with a
        :class:`DeprecationWarning`; it used to hide ``nn.Module.apply``, so ``model.apply(fn)`` failed.
        """
        if text_tower is not None:
            warnings.warn(
                "AdaptationStrategy.apply(image_tower, text_tower) is deprecated: use "
                "attach(image_tower, text_tower); apply(fn) is torch.nn.Module.apply again",
                DeprecationWarning,
                stacklevel=2,
            )
            self.attach(fn, text_tower)  # type: ignore[arg-type]
            return self
        return super().apply(fn)  # type: ignore[arg-type]

    def group_of(self, name: str) -> str:
        """The group of a parameter, from its name in the LightningModule."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf in TEMPERATURE_NAMES:
            return "temperature"
        if self.prefix and any(part.startswith(self.prefix) for part in name.split(".")):
            return "method"
        if ".projection." in f".{name}":
            return "head"
        return "backbone"

    def named_trainable(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of ``module`` that requires grad."""
        return ((n, p) for n, p in module.named_parameters() if p.requires_grad)

    def parameter_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups: one per (group, decay) pair that has parameters.

        Weight decay is switched off for biases, norm gains, other tensors with fewer than two dimensions
        (gates, prompts' scalars) and the temperature; per-group learning rates come from ``group_lr``.
        """
        no_decay_ids = _no_decay_parameter_ids(module) if self.no_decay_norms_and_biases else set()
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        names: dict[tuple[str, bool], list[str]] = {}
        for name, parameter in self.named_trainable(module):
            group = self.group_of(name)
            decay = id(parameter) not in no_decay_ids and group != "temperature"
            buckets.setdefault((group, decay), []).append(parameter)
            names.setdefault((group, decay), []).append(name)
        groups = []
        for (group, decay), params in buckets.items():
            entry: dict[str, Any] = {"params": params, "name": f"{group}{'' if decay else '/no_decay'}"}
            entry["param_names"] = names[(group, decay)]
            if not decay:
                entry["weight_decay"] = 0.0
            if group in self.group_lr:
                entry["lr"] = self.group_lr[group]
            groups.append(entry)
        if not groups:
            raise ValueError(f"{type(self).__name__} left no parameter to train")
        return groups

    def trainable_by_group(self, module: nn.Module) -> dict[str, int]:
        """Trainable parameter counts in the four groups."""
        counts = dict.fromkeys(PARAMETER_GROUPS, 0)
        for name, parameter in self.named_trainable(module):
            counts[self.group_of(name)] += parameter.numel()
        return counts

    def adapter_state_keys(self, module: nn.Module) -> list[str]:
        """State-dict keys an adapter-only checkpoint keeps: trainable parameters and prefixed buffers."""
        trainable = {n for n, _ in self.named_trainable(module)}
        # A norm whose affine parameters train may also update running statistics (BatchNorm in train
        # mode): its buffers belong with them, or the adapter would not reproduce the trained model.
        for name, submodule in module.named_modules():
            trains = any(p.requires_grad for p in submodule.parameters(recurse=False))
            if isinstance(submodule, _NORM_TYPES) and trains:
                trainable.update(f"{name}.{b}" for b, _ in submodule.named_buffers(recurse=False))
        keys = []
        for key in module.state_dict(keep_vars=True):
            if (
                key in trainable
                or (self.prefix and any(p.startswith(self.prefix) for p in key.split(".")))
                or key.startswith("strategy.")
            ):
                keys.append(key)
        return keys


def constructor_arguments(cls: type[AdaptationStrategy]) -> list[str]:
    """The names a strategy class's constructor accepts, in order, through ``**kwargs`` forwarding.

    A subclass whose ``__init__`` takes ``**kwargs`` hands them to its parent (the convention of every
    strategy here, and what jsonargparse assumes), so the parent's arguments are accepted too.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        forwards = False
        for parameter in list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL and parameter.name not in names:
                names.append(parameter.name)
        if klass is AdaptationStrategy or not forwards:
            break
    return names


def plain_value(value: Any) -> Any:
    """``value`` as JSON-ready containers and scalars (tuples become lists, dataclasses dicts).

    Anything else becomes its ``repr``, which still compares equal between equal simple values.
    """
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)


def _no_decay_parameter_ids(module: nn.Module) -> set[int]:
    ids: set[int] = set()
    for submodule in module.modules():
        if isinstance(submodule, _NORM_TYPES):
            ids.update(id(p) for p in submodule.parameters(recurse=False))
    for name, parameter in module.named_parameters():
        if parameter.ndim < 2 or name.endswith("bias") or name.rsplit(".", 1)[-1] in TEMPERATURE_NAMES:
            ids.add(id(parameter))
    return ids


# -- helpers strategies use to declare what trains --------------------------------------------------------
def unfreeze_norms(tower: Tower) -> int:
    """Make every normalisation layer's parameters in ``tower.model`` trainable; returns how many tensors."""
    count = 0
    for submodule in tower.model.modules():
        if isinstance(submodule, _NORM_TYPES):
            for parameter in submodule.parameters(recurse=False):
                parameter.requires_grad_(True)
                count += 1
    return count


def unfreeze_projection(tower: Tower) -> None:
    """Make the tower's projection head trainable."""
    tower.projection.requires_grad_(True)


@runtime_checkable
class Resettable(Protocol):
    """A layer that re-initialises its own parameters (PyTorch's convention: ``nn.Linear``, norms, ...)."""

    def reset_parameters(self) -> None:
        """Draw fresh initial parameters."""
        ...


def reset_parameters(module: nn.Module) -> None:
    """Re-initialise every layer that knows how (:class:`Resettable`): training from scratch."""
    for submodule in module.modules():
        if submodule is not module and isinstance(submodule, Resettable):
            submodule.reset_parameters()


def log_scale(scale: float) -> float:
    """``log(scale)``, the stored form of a learnable logit scale."""
    return math.log(scale)
