"""Forgetting: a second data set evaluated with the model before and after adaptation.

Adapting a dual encoder to one data set can cost it what it knew about others. A sweep measures this when
its suite names a second data config (``forgetting: configs/...yaml``, a file with a ``data:`` section like
any run config: a retrieval data module or a zero-shot classification one). The run's
:class:`~pefttune.benchmark.recorder.BenchmarkRecorder` then evaluates that data set's test split

* **before**: when training starts (after the strategy's ``on_fit_start``, so APEX's bank exists), i.e. the
  model as the strategy set it up, before any step;
* **after**: when the test of the trained model ends (the checkpoint the run is tested with),

with the model's own evaluation path (the strategy's evaluation embeddings, the model's tie rule), and
records ``forget/before/<metric>``, ``forget/after/<metric>`` and ``forget/change/<metric>`` (after minus
before) for every metric (``rsum``, ``i2t_R@1``, ..., or ``acc``, ``acc_base``, ...). A negative change of
RSUM or accuracy is forgetting. With new random projection heads (the offline default towers) the "before"
model has no aligned embedding space, so its numbers are chance level and the change is not forgetting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from pefttune.data.contracts import ClassificationData, RetrievalData

if TYPE_CHECKING:
    from pefttune.module import DualEncoderModule

#: Prefix of the recorded metrics (``forget/before/rsum``, ...).
PREFIX = "forget"


def load_data_config(path: str | Path) -> Any:
    """Build the data module of a config file's ``data:`` section (``class_path`` and ``init_args``).

    Nested classes (``source: {class_path: pefttune.data.sources.Synthetic, init_args: ...}``) are built
    as the CLI builds them, by jsonargparse.

    Raises:
        ValueError: If the file has no ``data`` section with a ``class_path``, or the section does not
            parse (names the file).
    """
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping) or "class_path" not in data:
        raise ValueError(
            f"{path}: a forgetting data config needs a 'data:' section with 'class_path' and 'init_args' "
            "(as in a run config)"
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=LightningDataModule)
    section = {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}
    try:
        return parser.instantiate(parser.parse_object({"data": section})).data
    except Exception as error:  # jsonargparse's ArgumentError, or the data module's own check
        raise ValueError(f"{path}: cannot build the 'data:' section: {error}") from error


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients, then every submodule's own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


class ForgettingEvaluation:
    """Evaluate a second data set's test split with a model, the way the model evaluates its own.

    Args:
        datamodule: A retrieval or classification data module (e.g. from :func:`load_data_config`).
        stage: The stage whose split is evaluated (``"test"``).
    """

    def __init__(self, datamodule: Any, stage: str = "test") -> None:
        self.datamodule = datamodule
        self.stage = stage
        self._prepared = False

    @classmethod
    def from_config(cls, path: str | Path) -> ForgettingEvaluation:
        """The evaluation of the data module defined by a config file's ``data:`` section."""
        return cls(load_data_config(path))

    def _prepare(self, module: DualEncoderModule) -> None:
        # What DualEncoderModule.setup does for its own data module: the towers' preprocessing, and the
        # words a learned text context plays removed from class prompts.
        from pefttune.evaluation import text_prompt_prefix

        data = self.datamodule
        if isinstance(data, RetrievalData):
            data.attach_preprocessing(module.preprocessing)
        if isinstance(data, ClassificationData):
            data.set_prompt_prefix(text_prompt_prefix(module.strategy))
        if not self._prepared:
            data.setup(self.stage)
            self._prepared = True

    def _loaders(self) -> list[Any]:
        loaders = getattr(self.datamodule, f"{self.stage}_dataloader")()
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def evaluate(self, module: DualEncoderModule) -> dict[str, float]:
        """The second data set's metrics with ``module`` as it is now (``rsum``, ... or ``acc``, ...).

        Returns:
            Metric name (without a stage prefix) -> value.

        Raises:
            RuntimeError: If the data module yields no evaluation batch.
        """
        from pefttune.evaluation import ZeroShotEvaluation, ZeroShotMetric
        from pefttune.metrics import RetrievalMetrics

        self._prepare(module)
        zero_shot = ZeroShotEvaluation.for_datamodule(self.datamodule, self.stage)
        retrieval = RetrievalMetrics(
            ks=module.test_retrieval.ks, chunk_size=module.test_retrieval.chunk_size, ties=module.tie_rule
        )
        accuracy = ZeroShotMetric()
        if zero_shot is None:
            data = self.datamodule
            texts = list(data.evaluation_texts(self.stage)) if isinstance(data, RetrievalData) else []
            module.strategy.on_evaluation_start(module, texts)
        batches = 0
        with _evaluation_mode(module):
            for index, loader in enumerate(self._loaders()):
                for batch in loader:
                    batch = _to_device(batch, module.device)
                    batches += 1
                    if "labels" in batch:
                        if zero_shot is None:
                            raise RuntimeError(
                                "a classification batch arrived but the data module has no class groups"
                            )
                        zero_shot.update(module, batch, index, accuracy)
                        continue
                    retrieval.update_from_batch(batch, *module.evaluation_embeddings(batch))
        if batches == 0:
            raise RuntimeError(f"the forgetting data module yielded no {self.stage} batch")
        results: dict[str, float] = {}
        if accuracy.update_called and zero_shot is not None:
            for name, value in zero_shot.results(PREFIX, accuracy).items():
                results[name.removeprefix(f"{PREFIX}/")] = float(value)
        if retrieval.update_called:
            results.update({name: float(value) for name, value in retrieval.compute().items()})
        return results


def forgetting_metrics(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``forget/before/<m>``, ``forget/after/<m>`` and ``forget/change/<m>`` (after - before) per metric."""
    out: dict[str, float] = {}
    for name in sorted(set(before) | set(after)):
        if name in before:
            out[f"{PREFIX}/before/{name}"] = float(before[name])
        if name in after:
            out[f"{PREFIX}/after/{name}"] = float(after[name])
        if name in before and name in after:
            out[f"{PREFIX}/change/{name}"] = float(after[name]) - float(before[name])
    return out
