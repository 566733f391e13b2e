"""The registry of built-in methods: one :func:`register_method` call per method.

Everything that lists methods reads it: the strategy test matrix (``tests/strategies/test_matrix.py``), the
benchmark suites (``methods: builtin`` in ``benchmarks/*.yaml``), the performance scripts
(``benchmarks/perf``), the README tables (``docs/gen_method_table.py``) and the CLI's message for an
unknown strategy (:func:`available_strategies`). Adding a built-in method is one strategy file, its offline
config, its documentation page and one call at the bottom of this file.

A user's own strategy needs no registration: any importable :class:`AdaptationStrategy` subclass works as
``class_path`` (see ``docs/custom_strategy.md``). :func:`register_method` is public so that a package of
methods can add its own and reuse the matrix, suites and tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pefttune.strategies.apex import APEX
from pefttune.strategies.base import AdaptationStrategy
from pefttune.strategies.cross_modal_adapter import CrossModalAdapter
from pefttune.strategies.duet import DueT
from pefttune.strategies.full import FullFineTune
from pefttune.strategies.lit import LiT
from pefttune.strategies.lora import LoRA

__all__ = [
    "MethodSpec",
    "available_strategies",
    "class_path",
    "get_method",
    "method_for_strategy",
    "methods",
    "register_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method and every place the project shows it.

    Attributes:
        name: The short name: the suites' method label, the offline config's file stem (``duet``).
        strategy: The :class:`AdaptationStrategy` subclass.
        paper: The reference, as the README cites it.
        config: The offline-default fit config (``configs/<name>.yaml``, relative to the repository root).
        paper_configs: Configs reproducing the paper's setting (may be empty).
        docs: The method's documentation page (``docs/methods/<page>.md``).
        test_arguments: Constructor arguments for the tiny test towers (small widths keep tests fast).
        table_rows: The README parameter table's rows for this method: ``(label, constructor arguments)``,
            each built on CLIP ViT-B/16 with the paper defaults plus those arguments.
    """

    name: str
    strategy: type[AdaptationStrategy]
    paper: str
    config: str
    paper_configs: tuple[str, ...] = ()
    docs: str = ""
    test_arguments: Mapping[str, Any] = field(default_factory=dict)
    table_rows: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    @property
    def class_path(self) -> str:
        """The strategy's import path, as configs name it."""
        return class_path(self.strategy)

    def build(self, **arguments: Any) -> AdaptationStrategy:
        """A new strategy with its defaults and ``arguments``."""
        return self.strategy(**arguments)

    def build_for_tests(self) -> AdaptationStrategy:
        """A new strategy sized for the tiny test towers (``test_arguments``)."""
        return self.strategy(**self.test_arguments)


_METHODS: dict[str, MethodSpec] = {}


def class_path(strategy: type[AdaptationStrategy]) -> str:
    """``module.Class`` of a strategy class."""
    return f"{strategy.__module__}.{strategy.__qualname__}"


def register_method(
    name: str,
    strategy: type[AdaptationStrategy],
    *,
    paper: str,
    config: str,
    paper_configs: tuple[str, ...] = (),
    docs: str = "",
    test_arguments: Mapping[str, Any] | None = None,
    table_rows: tuple[tuple[str, Mapping[str, Any]], ...] = (),
) -> MethodSpec:
    """Register a method (see :class:`MethodSpec` for the arguments) and return its entry.

    Raises:
        ValueError: when the name is taken, the class is not an :class:`AdaptationStrategy`, is registered
            under another name, or its ``prefix`` is another method's (adapter checkpoints filter by it).
    """
    if not name.isidentifier() or name != name.lower() or name == "builtin":
        # "builtin" stands for every registered method in a benchmark suite.
        raise ValueError(f"a method name is a lower-case identifier other than 'builtin', got {name!r}")
    if not (isinstance(strategy, type) and issubclass(strategy, AdaptationStrategy)):
        raise ValueError(f"method {name!r}: {strategy!r} is not an AdaptationStrategy subclass")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].class_path})")
    for other in _METHODS.values():
        if other.strategy is strategy:
            raise ValueError(f"{class_path(strategy)} is already registered as {other.name!r}")
        if strategy.prefix and other.strategy.prefix == strategy.prefix:
            raise ValueError(
                f"method {name!r}: prefix {strategy.prefix!r} is already used by {other.name!r}; "
                "adapter checkpoints and the 'method' parameter group filter by it"
            )
    spec = MethodSpec(
        name=name,
        strategy=strategy,
        paper=paper,
        config=config,
        paper_configs=tuple(paper_configs),
        docs=docs,
        test_arguments=MappingProxyType(dict(test_arguments or {})),
        table_rows=tuple((label, MappingProxyType(dict(args))) for label, args in table_rows),
    )
    _METHODS[name] = spec
    return spec


def methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``.

    Raises:
        KeyError: naming the registered methods.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no method named {name!r}; registered: {', '.join(_METHODS)}") from None


def method_for_strategy(strategy: type[AdaptationStrategy]) -> MethodSpec | None:
    """The entry of a strategy class (None for unregistered ones, such as a user's own)."""
    return next((spec for spec in _METHODS.values() if spec.strategy is strategy), None)


def available_strategies() -> dict[str, str]:
    """Method name -> strategy class path of every registered method, for error messages and listings."""
    return {spec.name: spec.class_path for spec in _METHODS.values()}


# -- the built-in methods: one call each ---------------------------------------------------------------------
register_method(
    "full",
    FullFineTune,
    paper="CLIP / FLYP recipe",
    config="configs/full.yaml",
    docs="docs/methods/full.md",
    table_rows=(("Full fine-tuning", {}),),
)
register_method(
    "lit",
    LiT,
    paper="Zhai et al., CVPR 2022",
    config="configs/lit.yaml",
    docs="docs/methods/lit.md",
    table_rows=(("LiT (image tower locked)", {}),),
)
register_method(
    "duet",
    DueT,
    paper="Hasegawa et al., EMNLP 2023",
    config="configs/duet.yaml",
    paper_configs=("configs/paper/duet_vitb16_bert.yaml",),
    docs="docs/methods/duet.md",
    test_arguments={"width": 16},
    table_rows=(("DueT (m = 3072)", {"width": 3072}), ("DueT (m = 96)", {"width": 96})),
)
register_method(
    "cma",
    CrossModalAdapter,
    paper="Jiang et al., Pattern Recognition 2024",
    config="configs/cma.yaml",
    paper_configs=("configs/paper/cma_clip_vitb32.yaml",),
    docs="docs/methods/cross_modal_adapter.md",
    test_arguments={"bottleneck": 4, "shared_dim": 4},
    table_rows=(("Cross-Modal Adapter (r = 8, d_s = 16)", {}),),
)
register_method(
    "lora",
    LoRA,
    paper="Zanella and Ben Ayed, CVPRW 2024",
    config="configs/lora.yaml",
    paper_configs=("configs/paper/lora_clip_vitb16.yaml",),
    docs="docs/methods/lora.md",
    table_rows=(("LoRA (r = 2, q/k/v)", {}),),
)
register_method(
    "apex",
    APEX,
    paper="Yang et al., EMNLP 2023",
    config="configs/apex.yaml",
    paper_configs=("configs/paper/apex_clip_vitb16.yaml",),
    docs="docs/methods/apex.md",
    table_rows=(("APEX", {}),),
)
