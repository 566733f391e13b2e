"""Gradient caching for contrastive batches larger than activation memory allows (GradCache).

Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021). A contrastive loss couples every pair of a batch, so the batch cannot be split into
independent micro-batches; but the loss only depends on the towers through the embeddings. GradCache
therefore

1. encodes the batch chunk by chunk **without** an autograd graph (activation memory of one chunk);
2. computes the loss over the whole batch from those embeddings, and its gradient with respect to them
   (a ``[B, D]`` tensor per tower, cheap);
3. encodes each chunk again, this time with a graph, and back-propagates the chunk's slice of the
   embedding gradient through it (the chain rule: ``dL/dtheta = sum_chunks (dL/de_chunk) de_chunk/dtheta``).

The parameter gradients equal those of the full-batch computation, at the cost of a second forward pass
of the trainable towers. For the re-run to reproduce the first pass exactly, the random number generator
state is saved before each chunk and restored for its re-run (dropout draws the same masks), and the
autocast state of the first pass is re-entered.

The functional core is :func:`cached_embeddings`: it returns the chunk embeddings concatenated as one
tensor whose backward pass runs step 3 (a custom autograd function, re-entrant like
``torch.utils.checkpoint``'s re-entrant mode), so any caller's ``loss.backward()`` (a plain loop,
Lightning's automatic optimisation, a gradient scaler) back-propagates into the towers::

    images = cached_embeddings(model.encode_images, pixels.split(64))
    texts = cached_embeddings(lambda c: model.encode_texts(*c), list(zip(ids.split(64), mask.split(64))))
    loss_fn(images, texts, model.logit_scale_value).backward()   # == the full-batch gradients

Semantics worth knowing:

* **Data parallelism.** The loss's all-gather carries gradient (see :mod:`pefttune.losses`), so each rank's
  embedding gradient already holds the other ranks' contributions; each rank then back-propagates its own
  chunks. The several backward passes of one step must not go through DDP's reducer (it expects one
  backward per forward and each parameter ready once), so the caller runs the step under
  ``DistributedDataParallel.no_sync()`` and averages the gradients itself with
  :func:`average_gradients` (what :class:`~pefttune.module.DualEncoderModule` does).
* **BatchNorm in training mode** normalises each chunk with the chunk's statistics, as a smaller batch
  would: GradCache is exact for towers without batch statistics (transformers, frozen or locked CNNs). The
  re-run would update the running statistics a second time; pass the towers as ``modules`` and their
  running statistics are restored after the re-run.
* **Memory.** The first pass keeps only the embeddings and references to the chunk inputs; the re-run
  holds one chunk's graph at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "average_gradients",
    "broadcast_from_first_rank",
    "cached_embeddings",
    "running_statistics",
    "split_batch",
]

Chunk = TypeVar("Chunk")


@dataclass(frozen=True)
class _RandomState:
    """The generator states a chunk's forward pass started from (CPU and, if used, one CUDA device)."""

    cpu: Tensor
    cuda_device: int | None
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), index, torch.cuda.get_rng_state(index))
        return cls(torch.get_rng_state(), None, None)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state, then give the generators back the state they had before."""
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


@dataclass(frozen=True)
class _AutocastState:
    """Whether autocast was on for a device type during the first pass, and with which dtype."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> _AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def context(self) -> contextlib.AbstractContextManager:
        """Autocast as the first pass had it (the backward pass runs outside the caller's autocast)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            with contextlib.suppress(TypeError):
                return _first_tensor(item)
    raise TypeError(f"a GradCache chunk must hold at least one tensor, got {type(value).__name__}")


_BatchNorm = nn.modules.batchnorm._BatchNorm


def running_statistics(*modules: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every BatchNorm in training mode under ``modules`` (no repeats).

    Those are the buffers a forward pass in training mode updates.
    """
    found: dict[int, Tensor] = {}
    for root in modules:
        for layer in root.modules():
            if isinstance(layer, _BatchNorm) and layer.training and layer.track_running_stats:
                for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                    if buffer is not None:
                        found.setdefault(id(buffer), buffer)
    return list(found.values())


class _ChunkReplay:
    """What the re-run of one side needs: the encoder, its chunks, their starting states and row counts."""

    def __init__(
        self,
        encode: Callable[[Any], Tensor],
        chunks: Sequence[Any],
        states: list[_RandomState],
        sizes: list[int],
        autocast: _AutocastState,
        modules: Sequence[nn.Module],
    ) -> None:
        self.encode = encode
        self.chunks = chunks
        self.states = states
        self.sizes = sizes
        self.autocast = autocast
        self.modules = modules

    def backward(self, grad: Tensor) -> None:
        """Re-run every chunk with a graph and back-propagate its rows of ``grad``."""
        saved = [(buffer, buffer.detach().clone()) for buffer in running_statistics(*self.modules)]
        for chunk, state, rows in zip(self.chunks, self.states, grad.split(self.sizes), strict=True):
            with state.replayed(), torch.enable_grad(), self.autocast.context():
                embeddings = self.encode(chunk)
            if embeddings.requires_grad:
                torch.autograd.backward(embeddings, rows.to(embeddings.dtype))
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class _ReplayOnBackward(torch.autograd.Function):
    """Identity on the cached embeddings; its backward re-runs the chunks (re-entrant, like checkpoint)."""

    @staticmethod
    def forward(ctx: Any, replay: _ChunkReplay, anchor: Tensor, embeddings: Tensor) -> Tensor:
        ctx.replay = replay
        return embeddings.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        ctx.replay.backward(grad)
        return None, None, None


def cached_embeddings(
    encode: Callable[[Chunk], Tensor],
    chunks: Sequence[Chunk],
    *,
    modules: Sequence[nn.Module] = (),
) -> Tensor:
    """Embed ``chunks`` without an autograd graph; back-propagating into the result re-runs each chunk.

    Args:
        encode: Maps one chunk to its embeddings ``[b, D]``; called once per chunk now (under
            ``torch.no_grad()``) and once more per chunk during the backward pass, from the same random
            state and under the same autocast setting.
        chunks: The batch, split along its rows (e.g. :func:`split_batch`); any objects ``encode`` takes,
            each holding at least one tensor (its device selects the generator state to save).
        modules: Modules whose BatchNorm running statistics the re-run must not update a second time
            (the towers ``encode`` runs).

    Returns:
        The embeddings of all chunks concatenated, ``[sum of b, D]``. In grad mode the result requires grad
        and its backward pass re-runs the chunks, accumulating the towers' parameter gradients (a re-run
        whose embeddings need no grad, e.g. a tower with nothing trainable, is dropped; do not pass a locked
        tower here, it would be run twice for nothing). Outside grad mode, a plain tensor.

    Raises:
        ValueError: If ``chunks`` is empty.
    """
    if len(chunks) == 0:
        raise ValueError("cached_embeddings needs at least one chunk")
    device = _first_tensor(chunks[0]).device
    autocast = _AutocastState.capture(device)
    states, outputs = [], []
    track = torch.is_grad_enabled()
    with torch.no_grad():
        for chunk in chunks:
            if track:
                states.append(_RandomState.capture(_first_tensor(chunk).device))
            outputs.append(encode(chunk))
    embeddings = torch.cat(outputs)
    if not track:
        return embeddings
    replay = _ChunkReplay(encode, chunks, states, [o.shape[0] for o in outputs], autocast, tuple(modules))
    # The function needs an input that requires grad for autograd to call its backward at all.
    anchor = torch.empty(0, device=embeddings.device, requires_grad=True)
    return _ReplayOnBackward.apply(replay, anchor, embeddings)


def split_batch(tensors: Mapping[str, Tensor], chunk_size: int) -> list[dict[str, Tensor]]:
    """Split every tensor of a batch along its first dimension into chunks of ``chunk_size`` rows.

    Args:
        tensors: Tensors with the same number of rows.
        chunk_size: Rows per chunk (the last chunk may be smaller).

    Returns:
        One dict per chunk, with the same keys.

    Raises:
        ValueError: On a chunk size below 1 or tensors with different numbers of rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = {key: int(value.shape[0]) for key, value in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the tensors of a batch to split must have the same number of rows, got {rows}")
    pieces = {key: value.split(chunk_size) for key, value in tensors.items()}
    count = len(next(iter(pieces.values()))) if pieces else 0
    return [{key: parts[i] for key, parts in pieces.items()} for i in range(count)]


def average_gradients(parameters: Iterable[nn.Parameter], bucket_mb: float = 25.0) -> int:
    """Average the gradients of ``parameters`` over all ranks, as DistributedDataParallel would.

    For steps whose backward passes ran outside DDP's reducer (GradCache under ``no_sync``). Gradients
    are flattened into buckets of about ``bucket_mb`` megabytes per dtype and device, all-reduced and
    divided by the world size. A parameter without a gradient on this rank takes part with zeros (and then
    gets the averaged gradient), so every rank issues the same collectives.

    Args:
        parameters: The trainable parameters, in the same order on every rank.
        bucket_mb: Size of one all-reduce.

    Returns:
        The number of all-reduce calls issued (0 when not running distributed).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    world = dist.get_world_size()
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    calls = 0
    for bucket in _buckets((p.grad for p in params), int(bucket_mb * 2**20)):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        _unflatten_into(flat, bucket)
        calls += 1
    return calls


def _buckets(tensors: Iterable[Tensor], limit_bytes: int) -> list[list[Tensor]]:
    """Group tensors by dtype and device into lists of about ``limit_bytes`` (order kept within a group)."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        lists = groups.setdefault(key, [[]])
        if lists[-1] and sizes[key] >= limit_bytes:
            lists.append([])
            sizes[key] = 0
        lists[-1].append(tensor)
        sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
    return [bucket for lists in groups.values() for bucket in lists]


def broadcast_from_first_rank(tensors: Iterable[Tensor], bucket_mb: float = 25.0) -> int:
    """Overwrite ``tensors`` with rank 0's values on every rank (coalesced), as DDP does with buffers.

    Args:
        tensors: The same tensors, in the same order, on every rank.
        bucket_mb: Size of one broadcast.

    Returns:
        The number of broadcasts issued (0 when not running distributed).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    calls = 0
    for bucket in _buckets(tensors, int(bucket_mb * 2**20)):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, bucket)
        calls += 1
    return calls


def _unflatten_into(flat: Tensor, targets: list[Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for target in targets:
            target.copy_(flat[offset : offset + target.numel()].view_as(target))
            offset += target.numel()
