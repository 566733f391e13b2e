"""SharedEpoch: one epoch counter for datasets whose draw changes per epoch, visible to loader workers."""

import torch
from torch.utils.data import DataLoader, Dataset

from pefttune.data.epoch import SharedEpoch


class _EpochEcho(SharedEpoch, Dataset):
    def __init__(self) -> None:
        self._init_shared_epoch()

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return self.epoch


def test_set_epoch_round_trips_in_shared_memory():
    dataset = _EpochEcho()
    assert dataset.epoch == 0 and dataset._epoch.is_shared()
    dataset.set_epoch(3)
    assert dataset.epoch == 3


def test_a_persistent_worker_sees_the_epoch_set_in_the_main_process():
    dataset = _EpochEcho()
    loader = DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    assert torch.equal(next(iter(loader)), torch.tensor([0, 0]))
    dataset.set_epoch(5)  # after the worker started, holding its own copy of the dataset
    assert torch.equal(next(iter(loader)), torch.tensor([5, 5]))
