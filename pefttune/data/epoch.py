"""An epoch number shared with data-loader workers, for datasets whose draw changes every epoch."""

from __future__ import annotations

import torch


class SharedEpoch:
    """Mixin: ``epoch`` / ``set_epoch`` backed by a one-element tensor in shared memory.

    The data loader sets the epoch in the main process before each pass; persistent (and forked) workers hold
    their own copy of the dataset, so a plain attribute would stay at its old value there. The shared tensor
    is the one value every copy reads. Call :meth:`_init_shared_epoch` in ``__init__``; what the epoch seeds
    (caption draw, shard order, prompt template) is the dataset's business.
    """

    _epoch: torch.Tensor

    def _init_shared_epoch(self) -> None:
        """Create the shared epoch counter at epoch 0."""
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch this pass draws with (as set in the main process)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (the data loader calls this in the main process before each pass)."""
        self._epoch[0] = int(epoch)
