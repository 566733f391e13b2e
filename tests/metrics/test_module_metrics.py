"""The model's retrieval metrics: the tie rule is an option of DualEncoderModule, collapse shows in the logs."""

from __future__ import annotations

import pytest
import torch

from pefttune.module import DualEncoderModule
from pefttune.testing import tiny_bert, tiny_vit


def _module(**kwargs: object) -> DualEncoderModule:
    return DualEncoderModule(tiny_vit(), tiny_bert(), **kwargs)  # type: ignore[arg-type]


def test_tie_rule_defaults_to_expected_and_reaches_both_metrics() -> None:
    module = _module()
    assert module.tie_rule == "expected"
    assert module.val_retrieval.ties == "expected" and module.test_retrieval.ties == "expected"
    module = _module(tie_rule="pessimistic")
    assert module.val_retrieval.ties == "pessimistic" and module.test_retrieval.ties == "pessimistic"


def test_unknown_tie_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="ties must be one of"):
        _module(tie_rule="random")


def test_a_collapsed_model_logs_the_flag_and_its_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose towers map everything to one vector: flagged, every query tied, R@1 at chance."""
    module = _module()
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **_: logged.update(values))
    constant = torch.ones(1, module.image_tower.embed_dim)
    monkeypatch.setattr(
        module, "evaluation_embeddings", lambda batch: (constant.expand(4, -1), constant.expand(8, -1))
    )
    batch = {
        "image_ids": torch.arange(4),
        "caption_ids": torch.arange(8),
        "caption_image_ids": torch.arange(4).repeat_interleave(2),
    }
    module._evaluation_update(batch, 0, module.test_retrieval, module.test_zero_shot)
    with pytest.warns(UserWarning, match="collapsed"):
        module._log_retrieval("test", module.test_retrieval)
    assert logged["test/collapsed"] == 1.0
    assert logged["test/i2t_tied_queries"] == 4 and logged["test/t2i_tied_queries"] == 8
    assert logged["test/i2t_R@1"] == pytest.approx(25.0) and logged["test/t2i_R@1"] == pytest.approx(25.0)
