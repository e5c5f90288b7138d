"""Model outputs: dataclasses with transformers' field names, indexable like transformers' ``ModelOutput``.

``out.logits``, ``out["logits"]``, ``out[0]`` (the first field that is not None), ``out[1:]``,
``out.to_tuple()``, ``keys()`` / ``values()`` / ``items()`` and ``len(out)`` all behave as in
transformers: fields set to ``None`` are left out of the tuple view.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    """Base of the output dataclasses (see the module docstring)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def values(self) -> list[Any]:
        return [value for _, value in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())


@dataclass
class ReformerModelOutput(ModelOutput):
    """``last_hidden_state [B, L, 2 * hidden]``; ``hidden_states``: ``num_layers + 1`` tensors ``[B, L', hidden]``
    (``L'`` the padded length, as transformers returns them); ``attentions``: per layer, ``[B, H, L, L]`` for
    full attention or ``[B, H, R * L / c, c, c * (before + 1 + after)]`` in visiting order for chunked attention.
    ``past_buckets_states``: the decoding cache (``reformer.ReformerDynamicCache``) when ``use_cache=True``."""

    last_hidden_state: torch.Tensor | None = None
    past_buckets_states: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ReformerModelWithLMHeadOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_buckets_states: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


__all__ = [
    "MaskedLMOutput",
    "ModelOutput",
    "QuestionAnsweringModelOutput",
    "ReformerModelOutput",
    "ReformerModelWithLMHeadOutput",
    "SequenceClassifierOutput",
]
