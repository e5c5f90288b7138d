"""Reformer models for PyTorch: transformers-compatible classes, checkpoints and outputs, with the hot
paths (LSH hashing, bucket sort, chunked attention, axial position embeddings) in ``reformer_kernels``."""

from .configuration_reformer import ReformerConfig
from .generation import ReformerDynamicCache
from .modeling_outputs import (
    MaskedLMOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
    ReformerModelOutput,
    ReformerModelWithLMHeadOutput,
    SequenceClassifierOutput,
)
from .modeling_reformer import (
    ReformerAttention,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerLayer,
    ReformerModel,
    ReformerModelWithLMHead,
    ReformerPreTrainedModel,
)
from .tokenization_reformer import ReformerByteTokenizer, ReformerTokenizer, load_tokenizer

__all__ = [
    "MaskedLMOutput",
    "ModelOutput",
    "QuestionAnsweringModelOutput",
    "ReformerAttention",
    "ReformerConfig",
    "ReformerDynamicCache",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerLayer",
    "ReformerModel",
    "ReformerModelOutput",
    "ReformerModelWithLMHead",
    "ReformerModelWithLMHeadOutput",
    "ReformerPreTrainedModel",
    "ReformerByteTokenizer",
    "load_tokenizer",
    "ReformerTokenizer",
    "SequenceClassifierOutput",
]
