"""Checkpoint files that never lie: atomic writes, clear load errors, and adapter-only checkpoints.

Writes. Every file pefttune writes here (full checkpoints through :class:`AtomicCheckpointIO`, adapter files
through :func:`save_adapter`) goes to a temporary file in the destination folder, is flushed to the
disk (``fsync``) and then renamed over the destination (:func:`atomic_write`). A crash, a ``kill -9`` or
a full disk leaves the previous file as it was; a full disk is reported as ``no space left on device: PATH``.

Reads. :func:`describe_unreadable` turns a truncated, empty or foreign file into one sentence naming the
path; :func:`check_checkpoint_fits` compares a full checkpoint with the model it is loaded into and names
the strategy that saved it when it does not fit, instead of a page of missing and unexpected keys.

Adapter-only checkpoints hold what :meth:`AdaptationStrategy.adapter_state_keys` names (the trainable
parameters and every tensor carrying the strategy's prefix) as a ``safetensors`` file; the strategy's class
path and constructor arguments, and the format version, are the file's metadata (JSON strings, no pickle)::

    {"format": "pefttune-adapter", "format_version": "2",
     "strategy": '{"class_path": "pefttune.strategies.lora.LoRA", "init_args": {"r": 2, ...}}'}

Version 1 files (``torch.save`` of ``{"format_version": 1, "strategy": ..., "state": ...}``, the ``.pt``
files of earlier releases) still load. An adapter is loaded into a model freshly built from the same config
(the backbone comes from its checkpoint as before), which then computes what the trained model computed.
LoRA adapters can also be exported in peft's own layout (:func:`export_peft_adapters`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

if TYPE_CHECKING:
    from pefttune.module import DualEncoderModule
    from pefttune.strategies.base import AdaptationStrategy

FORMAT_VERSION = 2
#: Metadata value of ``format`` in an adapter safetensors file.
ADAPTER_FORMAT = "pefttune-adapter"
#: Key under which a full checkpoint records the model's strategy (see :func:`checkpoint_record`).
CHECKPOINT_KEY = "pefttune"
_SHOWN = 10
_SAFETENSORS_HEADER_LIMIT = 100_000_000
# atomic_write's temporary files: "." + the destination's name + "." + mkstemp's 8 characters + ".tmp".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (empty, truncated, not a checkpoint) or does not fit the model."""


class AdapterMismatchError(ValueError):
    """An adapter checkpoint does not fit the model it is loaded into."""


# -- atomic writes -------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file all at once: a temporary file in the same folder, ``fsync``, then a rename over ``path``.

    The rename is atomic within one filesystem, which a temporary file in the destination folder guarantees
    (a temporary folder elsewhere may be another filesystem, where a "move" is a copy that a crash can cut).
    Readers see the previous file or the new one, never a part.

    Args:
        path: the destination file; its folder is created when missing.
        write: called with the open temporary file (binary) to write the content.

    Raises:
        OSError: ``no space left on device: PATH`` when the disk is full (the previous file is kept), or
            the operating system's error for other failures; the temporary file is removed either way.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle_fd, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        # mkstemp creates 0600 files; give the file the permissions a plain open() would have.
        os.fchmod(handle_fd, 0o666 & ~_umask())
        with os.fdopen(handle_fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"no space left on device: {path} (the previous file, if any, is unchanged)"
            ) from error
        raise
    _fsync_directory(directory)


def remove_stale_temporary_files(directory: str | os.PathLike[str] | None) -> list[str]:
    """Delete the temporary files of interrupted :func:`atomic_write` calls in ``directory``.

    A write killed before its rename (``kill -9``, a power cut) leaves ``.NAME.XXXX.tmp`` next to the
    intact ``NAME``; a run starting in that folder removes them. Only files of that exact shape go.

    Returns:
        The paths removed.
    """
    if directory is None or not _is_local_file_protocol(directory) or not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        if _TEMPORARY.match(name):
            path = os.path.join(os.fspath(directory), name)
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    # The rename itself is durable only once the folder's entry is on the disk (POSIX); Windows has no
    # directory handles to sync, and some filesystems refuse: the file is still complete either way.
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, with atomic local writes and readable load errors.

    Lightning's own writer serialises to a temporary file of the system's temporary folder and moves it into
    place: when the checkpoint folder is on another filesystem, that move is a copy a crash or a full disk
    can cut, leaving a truncated ``last.ckpt`` where the previous good one was. Here a local checkpoint goes
    through :func:`atomic_write`; remote paths (``s3://`` ...) keep Lightning's writer. Loading a file that
    is empty, truncated or not a checkpoint raises :class:`CheckpointError` naming the path and the problem.

    ``pefttune fit`` uses it by default (``trainer.plugins`` in ``--print_config``); in Python,
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote paths: Lightning's writer)."""
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint; an unreadable file raises :class:`CheckpointError` naming it."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
            if _is_local_file_protocol(path) and os.path.isfile(path):
                problem = describe_unreadable(path, error)
                if problem is not None:
                    raise CheckpointError(problem) from error
            raise


def describe_unreadable(path: str | os.PathLike[str], error: BaseException | None = None) -> str | None:
    """One sentence saying why a local checkpoint file cannot be read, or None when it looks whole.

    Args:
        path: the file.
        error: the error reading it raised, appended to the sentence when the file's shape explains nothing.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        return f"{path}: empty file (0 bytes), left by an interrupted write? Use an earlier checkpoint"
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return (
            f"{path}: truncated checkpoint ({size:,} bytes, the end of the file is missing), left by an "
            "interrupted write or copy? Use an earlier checkpoint"
        )
    if head[:2] != b"PK" and not _looks_like_safetensors(head, size):
        return f"{path}: not a PyTorch checkpoint ({size:,} bytes, no zip archive inside)"
    if error is not None:
        return f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {error})"
    return None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    header = int.from_bytes(head, "little")
    return 0 < header < min(size, _SAFETENSORS_HEADER_LIMIT)


# -- full checkpoints ----------------------------------------------------------------------------------------
def checkpoint_record(module: DualEncoderModule) -> dict[str, Any]:
    """What a full checkpoint records about the model beyond its weights: the strategy and its arguments."""
    return {"strategy": strategy_description(module.strategy)}


def check_checkpoint_fits(module: DualEncoderModule, checkpoint: dict[str, Any], path: object = None) -> None:
    """Refuse, in a few lines, a full checkpoint whose weights cannot go into ``module``.

    Raised when tensor shapes differ, when the checkpoint shares no weight with the model, or when the
    strategy that saved it (``checkpoint["pefttune"]``, written by
    :meth:`DualEncoderModule.on_save_checkpoint`) is another class and keys differ. Other differences are
    left to ``load_state_dict`` (and its ``strict``).

    Raises:
        CheckpointError: naming the path, the saving strategy and the model's, and a short key listing.
    """
    where = os.fspath(path) if isinstance(path, str | os.PathLike) else "the checkpoint"
    saved_state = checkpoint.get("state_dict")
    if not isinstance(saved_state, dict):
        raise CheckpointError(f"{where}: not a Lightning checkpoint of a model (no 'state_dict' entry)")
    model_state = module.state_dict()
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    mismatched = [
        f"{k}: checkpoint {tuple(saved_state[k].shape)}, model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in saved_state
        and isinstance(saved_state[k], torch.Tensor)
        and saved_state[k].shape != model_state[k].shape
    ]
    record = checkpoint.get(CHECKPOINT_KEY) or {}
    saved_strategy = record.get("strategy") or {}
    current = strategy_description(module.strategy)
    other_class = bool(saved_strategy) and saved_strategy.get("class_path") != current["class_path"]
    disjoint = bool(model_state) and len(missing) == len(model_state)
    if not (mismatched or disjoint or (other_class and (missing or unexpected))):
        return
    if other_class:
        reason = (
            f"saved by strategy {saved_strategy.get('class_path')}, the model uses {current['class_path']}"
        )
    elif disjoint:
        reason = "none of its weights belongs to this model (a checkpoint of another model?)"
    else:
        reason = "its weights do not fit this model (was it built from another config or backbone?)"
        differences = _argument_differences(saved_strategy.get("init_args"), current["init_args"])
        if differences:
            reason += _listing(f"{current['class_path']} arguments differ", differences)
    raise CheckpointError(
        f"{where}: {reason}"
        + _listing("missing", missing)
        + _listing("unexpected", unexpected)
        + _listing("shape mismatch", mismatched)
    )


def load_checkpoint_weights(
    module: DualEncoderModule, path: str | os.PathLike[str], strict: bool = True
) -> None:
    """Load a full Lightning checkpoint's weights into ``module``, with the checks of a Trainer's restore."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=False)
    check_checkpoint_fits(module, checkpoint, path)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)


def record_hyperparameters(module: DualEncoderModule, module_arguments: list[str]) -> None:
    """Save the hyperparameters that make ``DualEncoderModule.load_from_checkpoint(path)`` work.

    Built by LightningCLI, the module is given the run's whole ``model`` config (class paths and
    arguments of the towers, strategy, loss, optimizer) and records it in checkpoints and ``hparams.yaml``;
    ``load_from_checkpoint`` rebuilds the model from it. Built in Python, the arguments that are modules or
    callables (``module_arguments``) cannot be recorded: the plain ones are, and loading needs the others
    passed again (``load_from_checkpoint(path, image_tower=..., text_tower=...)``).
    """
    # Lightning private API (2.3-2.6): the config LightningCLI hands to save_hyperparameters. Ignoring the
    # module arguments there would drop the towers from the record, so they are ignored only outside it.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    given = _given_hyperparameters.get()
    module.save_hyperparameters(ignore=None if given is not None else module_arguments, frame=_caller_frame())


def _caller_frame() -> Any:
    import inspect

    frame = inspect.currentframe()
    # record_hyperparameters -> DualEncoderModule.__init__ (the frame whose arguments are recorded).
    return frame.f_back.f_back if frame is not None and frame.f_back is not None else None


# -- adapter-only checkpoints --------------------------------------------------------------------------------
def strategy_description(strategy: AdaptationStrategy) -> dict[str, Any]:
    """The strategy's import path and its :meth:`~AdaptationStrategy.checkpoint_arguments`."""
    cls = type(strategy)
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": _plain(strategy.checkpoint_arguments()),
    }


def adapter_state(module: DualEncoderModule) -> dict[str, torch.Tensor]:
    """The tensors of an adapter-only checkpoint, detached, contiguous and on the CPU."""
    state = module.state_dict()
    return {
        key: state[key].detach().cpu().contiguous().clone()
        for key in module.strategy.adapter_state_keys(module)
    }


def save_adapter(module: DualEncoderModule, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``module``'s adapter-only checkpoint to ``path`` (safetensors, written atomically).

    Returns:
        ``{"format_version", "strategy", "state"}``: what was written.
    """
    from safetensors.torch import save

    _refuse_merged(module, "save")
    description = strategy_description(module.strategy)
    state = adapter_state(module)
    metadata = {
        "format": ADAPTER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "strategy": json.dumps(description, sort_keys=True),
    }
    payload = save(state, metadata=metadata)
    atomic_write(path, lambda handle, data=payload: handle.write(data))
    return {"format_version": FORMAT_VERSION, "strategy": description, "state": state}


def read_adapter(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an adapter-only checkpoint (safetensors, or a version 1 ``torch.save`` file).

    Returns:
        ``{"format_version", "strategy", "state"}``.

    Raises:
        AdapterMismatchError: when the file is not an adapter checkpoint this version reads.
        CheckpointError: when the file is empty or truncated.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or len(head) < 8:
        problem = describe_unreadable(path)
        if problem is not None and not zipfile.is_zipfile(path):
            raise CheckpointError(problem)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "state" not in checkpoint:
            raise AdapterMismatchError(f"{path} is not an adapter checkpoint (no 'state' entry)")
        if checkpoint.get("format_version") != 1:
            raise AdapterMismatchError(
                f"{path}: adapter format {checkpoint.get('format_version')!r}, this version reads 1 and 2"
            )
        return {
            "format_version": 1,
            "strategy": checkpoint.get("strategy") or {},
            "state": checkpoint["state"],
        }
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            state = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable adapter checkpoint (truncated or not safetensors: {error})"
        ) from error
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterMismatchError(f"{path} is a safetensors file but not a pefttune adapter checkpoint")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise AdapterMismatchError(f"{path}: adapter format {version!r}, this version reads 1 and 2")
    return {"format_version": FORMAT_VERSION, "strategy": json.loads(metadata["strategy"]), "state": state}


def load_adapter(module: DualEncoderModule, path: str | os.PathLike[str]) -> None:
    """Load an adapter-only checkpoint into ``module``, built from the same config as the trained model.

    Raises:
        AdapterMismatchError: when the checkpoint's format, strategy or arguments differ from the
            model's, or its tensors do not match the model's adapter tensors (missing, unexpected or
            differently shaped keys, as when the backbone differs).
        CheckpointError: when the file is empty or truncated.
    """
    checkpoint = read_adapter(path)
    _check_strategy(path, checkpoint["strategy"], strategy_description(module.strategy))
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


def export_peft_adapters(module: DualEncoderModule, directory: str | os.PathLike[str]) -> dict[str, str]:
    """Write a LoRA model's adapters in peft's own layout, one folder per adapted tower.

    ``<directory>/image_tower`` and ``<directory>/text_tower`` each get ``adapter_model.safetensors`` and
    ``adapter_config.json``, which ``peft.PeftModel.from_pretrained(tower.model, folder)`` loads onto the
    bare backbone (``tower.model``) of a freshly built tower. Only the LoRA matrices are in peft's files;
    projection heads trained next to them (``train_projections``) are in the pefttune adapter file only.
    A tower whose fused ``qkv`` linear pefttune split into three (timm ViTs) has no such layers in its bare
    backbone, so it cannot be exported this way and is skipped.

    Returns:
        ``{tower name: folder written}``.

    Raises:
        TypeError: when the model's strategy is not :class:`~pefttune.strategies.lora.LoRA`.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    from pefttune.layers.split_qkv import SplitQKV
    from pefttune.strategies.lora import ADAPTER_NAME, LoRA

    strategy = module.strategy
    if not isinstance(strategy, LoRA):
        raise TypeError(
            f"peft's layout holds LoRA adapters; the model's strategy is {type(strategy).__name__}"
        )
    _refuse_merged(module, "export")
    written: dict[str, str] = {}
    for name, tower in (("image_tower", module.image_tower), ("text_tower", module.text_tower)):
        targets = strategy.target_names.get(tower.modality)
        if not targets or any(isinstance(m, SplitQKV) for m in tower.model.modules()):
            continue
        config = strategy.lora_config([target.removeprefix("model.") for target in targets])
        config.base_model_name_or_path = getattr(tower, "model_name", None)
        state = get_peft_model_state_dict(tower.model, adapter_name=ADAPTER_NAME)
        # PeftModel wraps the backbone twice (PeftModel -> LoraModel -> model): its keys carry that prefix.
        tensors = {
            f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()
        }
        folder = os.path.join(os.fspath(directory), name)
        payload = save(tensors, metadata={"format": "pt"})
        atomic_write(
            os.path.join(folder, "adapter_model.safetensors"), lambda handle, data=payload: handle.write(data)
        )
        config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default).encode()
        atomic_write(
            os.path.join(folder, "adapter_config.json"), lambda handle, data=config_json: handle.write(data)
        )
        written[name] = folder
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def _check_strategy(path: object, saved: dict[str, Any], current: dict[str, Any]) -> None:
    if saved.get("class_path") != current["class_path"]:
        raise AdapterMismatchError(
            f"{path} was saved by strategy {saved.get('class_path')!r}, "
            f"the model uses {current['class_path']!r}"
        )
    differences = _argument_differences(saved.get("init_args"), current["init_args"])
    if differences:
        raise AdapterMismatchError(
            f"{path} was saved with other {current['class_path']} arguments" + _listing("differ", differences)
        )


def _argument_differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    if saved is None or current is None:
        return []
    return [
        f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


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
    """``value`` as plain containers and scalars (what JSON and ``torch.load(weights_only=True)`` read)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return repr(value)
