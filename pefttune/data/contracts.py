"""The contract between the model (and its strategy) and a data module, declared as Protocols.

The model checks ``isinstance(datamodule, RetrievalData)`` instead of probing attributes. Both protocols are
``runtime_checkable``: any data module with these methods satisfies them, a user's own included.

- :class:`RetrievalData`: what :class:`~pefttune.module.DualEncoderModule` uses for retrieval
  (``attach_preprocessing`` in ``setup``; ``evaluation_texts`` before an evaluation loop, e.g. APEX's text
  bank; ``training_texts`` for APEX's bank of training texts; ``eval_captions`` to name the caption protocol
  in results). :class:`~pefttune.data.ImageTextDataModule` satisfies it.
- :class:`ClassificationData`: additionally ``evaluation_groups`` (one class group per evaluation dataloader)
  and ``set_prompt_prefix`` (a learned text context replacing the prompts' leading words).
  :class:`~pefttune.data.ClassificationDataModule` satisfies it; its evaluation batches hold ``labels``
  instead of captions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pefttune.data.classification import ClassGroup
    from pefttune.data.preprocessing import Preprocessing


@runtime_checkable
class RetrievalData(Protocol):
    """A data module feeding image-text (or video-text) retrieval."""

    #: The evaluation caption protocol: ``"all"`` (every caption of each item) or ``"one"`` (one per item).
    eval_captions: str

    def attach_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Receive the towers' transforms and tokenizer (called in the model's ``setup``)."""
        ...

    def evaluation_texts(self, stage: str) -> list[str]:
        """Every text an evaluation stage's dataloaders yield, in loader order."""
        ...

    def training_texts(self) -> list[str]:
        """Every text training draws from (APEX builds a bank of their frozen embeddings)."""
        ...


@runtime_checkable
class ClassificationData(RetrievalData, Protocol):
    """A data module feeding zero-shot classification (evaluation batches hold ``labels``)."""

    def evaluation_groups(self, stage: str) -> list[ClassGroup]:
        """The class groups an evaluation stage covers, one per dataloader."""
        ...

    def set_prompt_prefix(self, prefix: str) -> None:
        """Leading prompt words a strategy's learned text context plays ("" for none)."""
        ...


__all__ = ["ClassificationData", "RetrievalData"]
