"""Attach a strategy's modules to a tower without renaming the tower's own parameters.

A method's module is registered as a child of the module it transforms (so its parameters live in the
model's state dict under the method's name prefix, e.g. ``...blocks.3.duet_gau.ffn.0.weight``) and runs
through a forward hook (output transforms) or forward pre-hook (input transforms). The pretrained
parameter names stay as they were, so a checkpoint of the plain tower still loads into an adapted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def hidden_states(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden_states(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``hidden`` (same container type)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


#: Attribute counting the output transforms a checkpointed forward already applied (see below).
_APPLIED_INSIDE = "_pefttune_output_transforms_applied"


class _OutputTransform:
    """Forward hook calling ``host.<name>`` on the host's hidden-state output (picklable, unlike a lambda)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, host: nn.Module, _inputs: Any, output: Any) -> Any:
        pending = host.__dict__.get(_APPLIED_INSIDE, 0)
        if pending:
            # The host's checkpointed forward already applied it (CheckpointWithOutputTransforms).
            host.__dict__[_APPLIED_INSIDE] = pending - 1
            return None
        return self.apply(host, output)

    def apply(self, host: nn.Module, output: Any) -> Any:
        """``output`` with the transform applied to its hidden states."""
        transform = getattr(host, self.name)
        return replace_hidden_states(output, transform(hidden_states(output)))


def output_transforms(host: nn.Module) -> list[_OutputTransform]:
    """The output transforms registered on ``host`` (:func:`add_output_transform`), in the order they run."""
    # Module._forward_hooks is the ordered registry Module.__call__ runs the hooks from.
    return [hook for hook in host._forward_hooks.values() if isinstance(hook, _OutputTransform)]


class CheckpointWithOutputTransforms:
    """A layer's checkpoint function that recomputes the layer's output transforms too.

    transformers (5.x) checkpoints a layer's ``forward``, not its ``__call__``, so that module hooks stay
    outside the checkpoint. The output transforms of a strategy (DueT's units after every block) are such
    hooks, and their activations would then be kept for the whole backward pass, as without checkpointing
    (on CLIP ViT-B/16, batch 32: 986 MB of DueT's 1,548 MB). Installed as the layer's
    ``_gradient_checkpointing_func``, this checkpoints the forward followed by the layer's output
    transforms as one function, and tells the hooks that run after it that their transform is applied.

    Args:
        host: The layer.
        checkpoint: The checkpoint function (``torch.utils.checkpoint.checkpoint`` with its options).
    """

    def __init__(self, host: nn.Module, checkpoint: Callable[..., Any]) -> None:
        self.host = host
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        """Checkpoint ``function`` (the layer's forward) and then the layer's output transforms."""
        transforms = output_transforms(self.host)
        if not transforms:
            return self.checkpoint(function, *args)

        def forward_then_transforms(*inputs: Any) -> Any:
            output = function(*inputs)
            for transform in transforms:
                output = transform.apply(self.host, output)
            return output

        output = self.checkpoint(forward_then_transforms, *args)
        # Here, not inside the checkpointed function: the backward pass reruns that one, and must not count.
        self.host.__dict__[_APPLIED_INSIDE] = len(transforms)
        return output


class _InputTransform:
    """Forward pre-hook calling ``host.<name>`` on the host's first positional input."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        transform = getattr(host, self.name)
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: transform(kwargs[key])}


def add_output_transform(host: nn.Module, name: str, transform: nn.Module) -> RemovableHandle:
    """Register ``transform`` as ``host.<name>`` and apply it to every output of ``host``.

    Args:
        host: the module whose output is transformed (a block, an attention output projection, ...).
        name: attribute name, which carries the method's prefix (``duet_gau``, ``cma_adapter_attn``, ...).
        transform: maps the host's hidden states to new hidden states of the same shape.

    Raises:
        ValueError: when ``host`` already has an attribute called ``name``.
    """
    _register(host, name, transform)
    return host.register_forward_hook(_OutputTransform(name))


def add_input_transform(host: nn.Module, name: str, transform: nn.Module) -> RemovableHandle:
    """Register ``transform`` as ``host.<name>`` and apply it to the first input of ``host``."""
    _register(host, name, transform)
    return host.register_forward_pre_hook(_InputTransform(name), with_kwargs=True)


def _register(host: nn.Module, name: str, transform: nn.Module) -> None:
    if hasattr(host, name):
        raise ValueError(
            f"{type(host).__name__} already has an attribute {name!r}: was the strategy applied twice?"
        )
    host.add_module(name, transform)


def channels_last_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a function over the last dimension to a feature map [B, C, H, W] position-wise."""
    return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
