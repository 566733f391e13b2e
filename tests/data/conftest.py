"""Fixtures for the data tests."""

from __future__ import annotations

import pytest
from data_fixtures import WhitespaceTokenizer, to_tensor_8px

from pefttune.data.preprocessing import Preprocessing


@pytest.fixture
def tokenizer() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()


@pytest.fixture
def preprocessing() -> Preprocessing:
    return Preprocessing(
        train_transform=to_tensor_8px,
        eval_transform=to_tensor_8px,
        tokenize=WhitespaceTokenizer(),
        train_transform_is_deterministic=True,
    )
