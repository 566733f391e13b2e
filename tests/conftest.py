"""Shared test set-up: offline, deterministic, tiny towers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from pefttune.testing import TINY_TOWER_PAIRS


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY_TOWER_PAIRS))
def tower_pair(request: pytest.FixtureRequest) -> tuple:
    """Each tiny tower pair in turn (a ViT, a CNN and CLIP, each with a text tower)."""
    return TINY_TOWER_PAIRS[request.param]()
