"""Adapter-only checkpoints: the few tensors a strategy trains, without the frozen backbone.

An adapter checkpoint holds what :meth:`AdaptationStrategy.adapter_state_keys` names (the trainable
parameters and every tensor carrying the strategy's prefix), the strategy's class path and constructor
arguments, and a format version::

    {"format_version": 1,
     "strategy": {"class_path": "pefttune.strategies.lora.LoRA", "init_args": {"r": 2, ...}},
     "state": {"image_tower.model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight": tensor, ...}}

It is loaded into a model freshly built from the same config (the backbone comes from its checkpoint as
before), which then computes what the trained model computed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pefttune.module import DualEncoderModule
    from pefttune.strategies.base import AdaptationStrategy

FORMAT_VERSION = 1
_SHOWN = 10


class AdapterMismatchError(ValueError):
    """An adapter checkpoint does not fit the model it is loaded into."""


def strategy_description(strategy: AdaptationStrategy) -> dict[str, Any]:
    """The strategy's import path and its :meth:`~AdaptationStrategy.checkpoint_arguments`."""
    cls = type(strategy)
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": _plain(strategy.checkpoint_arguments()),
    }


def adapter_state(module: DualEncoderModule) -> dict[str, torch.Tensor]:
    """The tensors of an adapter-only checkpoint, detached and on the CPU."""
    state = module.state_dict()
    return {key: state[key].detach().cpu().clone() for key in module.strategy.adapter_state_keys(module)}


def save_adapter(module: DualEncoderModule, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``module``'s adapter-only checkpoint to ``path`` (a ``torch.save`` file) and return it."""
    _refuse_merged(module, "save")
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "strategy": strategy_description(module.strategy),
        "state": adapter_state(module),
    }
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save(checkpoint, path)
    return checkpoint


def load_adapter(module: DualEncoderModule, path: str | os.PathLike[str]) -> None:
    """Load an adapter-only checkpoint into ``module``, built from the same config as the trained model.

    Raises:
        AdapterMismatchError: when the checkpoint's format, strategy or arguments differ from the
            model's, or its tensors do not match the model's adapter tensors (missing, unexpected or
            differently shaped keys, as when the backbone differs).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state" not in checkpoint:
        raise AdapterMismatchError(f"{path} is not an adapter checkpoint (no 'state' entry)")
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterMismatchError(f"{path}: adapter format {version!r}, this version reads {FORMAT_VERSION}")
    _check_strategy(path, checkpoint.get("strategy") or {}, strategy_description(module.strategy))
    _refuse_merged(module, "load")
    saved: dict[str, torch.Tensor] = checkpoint["state"]
    model_state = module.state_dict()
    expected = module.strategy.adapter_state_keys(module)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in set(expected)]
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(model_state[k].shape)}"
        for k in expected
        if k in saved and saved[k].shape != model_state[k].shape
    ]
    if missing or unexpected or mismatched:
        raise AdapterMismatchError(
            f"{path} does not fit this model (was it built from another config or backbone?)"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("shape mismatch", mismatched)
        )
    with torch.no_grad():
        for key in expected:
            model_state[key].copy_(saved[key])


def _check_strategy(path: object, saved: dict[str, Any], current: dict[str, Any]) -> None:
    if saved.get("class_path") != current["class_path"]:
        raise AdapterMismatchError(
            f"{path} was saved by strategy {saved.get('class_path')!r}, "
            f"the model uses {current['class_path']!r}"
        )
    saved_args, current_args = saved.get("init_args"), current["init_args"]
    if saved_args is None or current_args is None:
        return
    differences = [
        f"{key}: checkpoint {saved_args.get(key)!r}, model {current_args.get(key)!r}"
        for key in sorted(set(saved_args) | set(current_args))
        if saved_args.get(key) != current_args.get(key)
    ]
    if differences:
        raise AdapterMismatchError(
            f"{path} was saved with other {current['class_path']} arguments" + _listing("differ", differences)
        )


def _refuse_merged(module: DualEncoderModule, action: str) -> None:
    # A merged model's backbone weights already contain the update; loading or saving then mixes states.
    if module.strategy.merged:
        raise RuntimeError(f"unmerge the strategy's weights before you {action} an adapter checkpoint")


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "\n    ".join(items[:_SHOWN])
    more = f"\n    ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"\n  {label} ({len(items)}):\n    {shown}{more}"


def _plain(value: Any) -> Any:
    """``value`` as plain containers and scalars (``torch.load(weights_only=True)`` reads only those)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return repr(value)
