"""Keep a frozen backbone's BatchNorm layers on their stored running statistics, also in training mode.

A tower that is frozen but not locked follows the LightningModule into training mode (Lightning calls
``train()`` at the start of fitting and after every validation). There BatchNorm would normalise with batch
statistics and overwrite its running averages, so the "frozen" backbone would change, and an adapter-only
checkpoint (which holds no backbone buffers) would not reproduce the trained model.

:func:`freeze_batchnorm_statistics` adds a forward pre-hook and a forward hook to every BatchNorm under a
module: the layer runs in eval mode for the duration of its forward pass, whatever ``train()`` set, and its
``training`` flag is restored afterwards, so it still reports the mode the model was asked for.

Hooks live on the layer objects, and module surgery that builds new layers loses them. Lightning's
``sync_batchnorm`` does exactly that: ``SyncBatchNorm.convert_sync_batchnorm`` replaces every BatchNorm with a
new ``SyncBatchNorm`` (and ``revert`` replaces those again at teardown). It keeps every other module, so
:func:`freeze_batchnorm_statistics` also records the request as a plain attribute on the module it was given,
and :func:`refreeze_batchnorm_statistics` re-applies every such record under a root module.
:class:`~pefttune.module.DualEncoderModule` calls it in ``on_fit_start``, after Lightning's conversion.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Attribute set to ``True`` on each module passed to :func:`freeze_batchnorm_statistics`.
FROZEN_BATCHNORM_RECORD = "_frozen_batchnorm_statistics"


class _RunningStatisticsHooks:
    """A BatchNorm layer's hook pair: eval mode during its forward, the requested mode otherwise.

    Bound methods of a module-level class rather than closures, so that models stay picklable (deep copies,
    checkpoints, spawned DDP workers).
    """

    def __init__(self) -> None:
        self.requested_training = False

    def before(self, layer: nn.Module, _inputs: Any) -> None:
        """Forward pre-hook: remember the requested mode and normalise with the running statistics."""
        self.requested_training = layer.training
        layer.training = False

    def after(self, layer: nn.Module, _inputs: Any, _output: Any) -> None:
        """Forward hook: restore the requested mode, so ``layer.training`` tells what was asked."""
        layer.training = self.requested_training


def freeze_batchnorm_statistics(module: nn.Module) -> int:
    """Make every BatchNorm layer under ``module`` use and keep its running statistics, also in training.

    Each layer normalises with its running statistics and never updates them, whatever ``train()`` set;
    its affine parameters still train if they require grad. The layers' ``training`` flags are left as they
    are (switching them now would make Lightning warn about modules in eval mode when training starts).
    Idempotent: a layer that already has the hooks does not get them twice.

    The request is recorded on ``module`` itself, so that :func:`refreeze_batchnorm_statistics` can apply
    it again to layers that replace the current ones. Pass a container (a tower, its backbone), not a
    BatchNorm layer: a replaced layer takes its record with it.

    Args:
        module: the module whose BatchNorm layers (at any depth, itself included) are frozen.

    Returns:
        How many layers got the hooks now (layers that already had them are not counted).
    """
    setattr(module, FROZEN_BATCHNORM_RECORD, True)
    added = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not has_frozen_batchnorm_statistics(layer):
            hooks = _RunningStatisticsHooks()
            layer.register_forward_pre_hook(hooks.before)
            layer.register_forward_hook(hooks.after)
            added += 1
    return added


def refreeze_batchnorm_statistics(root: nn.Module) -> int:
    """Apply :func:`freeze_batchnorm_statistics` again wherever under ``root`` it was applied before.

    Call it after any module surgery that may have replaced BatchNorm layers (such as
    ``SyncBatchNorm.convert_sync_batchnorm``); layers that kept their hooks are left alone.

    Args:
        root: the module to search (itself included) for recorded requests.

    Returns:
        How many layers got their hooks back.
    """
    return sum(
        freeze_batchnorm_statistics(module)
        for module in root.modules()
        if getattr(module, FROZEN_BATCHNORM_RECORD, False) is True
    )


def has_frozen_batchnorm_statistics(layer: nn.Module) -> bool:
    """Whether ``layer`` carries the hooks of :func:`freeze_batchnorm_statistics`."""
    # The hook registries are the truth: a flag on the layer could outlive hooks removed by their handles.
    return any(
        isinstance(getattr(hook, "__self__", None), _RunningStatisticsHooks)
        for hook in layer._forward_pre_hooks.values()
    )
