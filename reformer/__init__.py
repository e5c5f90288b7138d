"""Reformer models for PyTorch: transformers-native classes (``PreTrainedModel``, ``GenerationMixin``) with
transformers' names, checkpoints and outputs, and the hot paths (LSH hashing, bucket sort, chunked attention,
axial position embeddings) in ``reformer_kernels``."""

from transformers.modeling_outputs import MaskedLMOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput
from transformers.models.reformer.modeling_reformer import ReformerModelOutput, ReformerModelWithLMHeadOutput
from transformers.utils import ModelOutput

from .configuration_reformer import ReformerConfig
from .generation import ReformerDynamicCache
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
    "ReformerByteTokenizer",
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
    "ReformerTokenizer",
    "SequenceClassifierOutput",
    "load_tokenizer",
]
