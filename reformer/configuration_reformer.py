"""``ReformerConfig``: transformers' ``ReformerConfig`` with validation that names the field.

It *is* transformers' config class (a subclass, same ``model_type``, fields and defaults), so a config.json written
by transformers loads here and one written here loads in transformers, ``AutoConfig`` included. What this subclass
adds is validation: every field transformers reads is checked at construction, again by ``validate()`` (called when
a model is built from the config and when it is saved), and a bad value raises ``ValueError``/``TypeError`` naming
the field before anything runs. transformers accepts most of these and fails later, blaming valid input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

ATTN_LAYER_TYPES = ("lsh", "local")
# the activations of transformers' ACT2FN that the model implements (see ``modeling_reformer.ACT2FN``)
HIDDEN_ACTS = (
    "relu",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "relu6",
    "leaky_relu",
    "mish",
    "linear",
)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# a seed torch.Generator.manual_seed accepts
_MAX_HASH_SEED = 2**63


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype_name(dtype: Any) -> str | None:
    """``None``, a ``torch.dtype`` or its name (``"float16"``, ``"torch.float16"``) → the name; else an error."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is None else str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"config field dtype must name a torch dtype (e.g. 'float32'); got {dtype!r}")
        return name
    raise TypeError(f"config field dtype must be a torch.dtype, a dtype name or None; got {type(dtype).__name__}")


class _Fields:
    """Read access to a config's fields, given as an object or as a dict over transformers' defaults."""

    def __init__(self, source: Any):
        self._source = source

    def __getattr__(self, name: str) -> Any:
        if isinstance(self._source, Mapping):
            if name in self._source:
                return self._source[name]
            return getattr(transformers.ReformerConfig, name, None)
        return getattr(self._source, name, None)


def validate_reformer_fields(source: Any) -> None:
    """Check a Reformer config (an object or a dict of constructor arguments over transformers' defaults).

    Raises ``ValueError`` (bad value) or ``TypeError`` (wrong kind of value) naming the first bad field.
    """
    fields = _Fields(source)

    def positive_int(name: str) -> None:
        value = getattr(fields, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"config field {name} must be a positive int; got {value!r}")

    def non_negative_int(name: str) -> None:
        value = getattr(fields, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"config field {name} must be a non-negative int; got {value!r}")

    def probability(name: str, allow_none: bool = False) -> None:
        value = getattr(fields, name)
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"config field {name} must be a probability in [0, 1); got {value!r}")

    def int_list(name: str) -> list[int]:
        value = getattr(fields, name)
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"config field {name} must be a non-empty list of positive ints; got {value!r}")
        if any(not _is_int(v) or v < 1 for v in value):
            raise ValueError(f"config field {name} must be a list of positive ints; got {list(value)}")
        return list(value)

    for name in (
        "attention_head_size",
        "feed_forward_size",
        "hidden_size",
        "max_position_embeddings",
        "num_attention_heads",
        "num_hashes",
        "vocab_size",
    ):
        positive_int(name)
    for name in ("chunk_size_lm_head", "chunk_size_feed_forward"):
        non_negative_int(name)
    for name in ("hidden_dropout_prob", "local_attention_probs_dropout_prob", "lsh_attention_probs_dropout_prob"):
        probability(name)
    probability("classifier_dropout", allow_none=True)

    layers = fields.attn_layers
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"config field attn_layers must be a non-empty list of {ATTN_LAYER_TYPES}; got {layers!r}")
    unknown = sorted({str(layer) for layer in layers if layer not in ATTN_LAYER_TYPES})
    if unknown:
        raise ValueError(
            f"config field attn_layers has unknown attention layer types {unknown}; choose from {ATTN_LAYER_TYPES}"
        )
    for kind in sorted(set(layers)):
        positive_int(f"{kind}_attn_chunk_length")
        non_negative_int(f"{kind}_num_chunks_before")
        non_negative_int(f"{kind}_num_chunks_after")

    if not isinstance(fields.axial_pos_embds, bool):
        raise TypeError(f"config field axial_pos_embds must be a bool; got {fields.axial_pos_embds!r}")
    axial_shape, axial_dims = int_list("axial_pos_shape"), int_list("axial_pos_embds_dim")
    if fields.axial_pos_embds:
        if len(axial_shape) != len(axial_dims):
            raise ValueError(
                f"config fields axial_pos_shape {axial_shape} and axial_pos_embds_dim {axial_dims} must have the "
                "same number of axes"
            )
        if sum(axial_dims) != fields.hidden_size:
            raise ValueError(
                f"config field axial_pos_embds_dim {axial_dims} must sum to config.hidden_size {fields.hidden_size}; "
                f"it sums to {sum(axial_dims)}"
            )

    buckets = fields.num_buckets
    if buckets is not None:
        factors = [buckets] if _is_int(buckets) else buckets
        if isinstance(factors, str) or not isinstance(factors, Sequence) or len(factors) == 0:
            raise ValueError(f"config field num_buckets must be None, an int or a list of ints; got {buckets!r}")
        if any(not _is_int(factor) or factor < 2 or factor % 2 != 0 for factor in factors):
            raise ValueError(f"config field num_buckets must contain even ints >= 2 (bucket factors); got {buckets!r}")

    seed = fields.hash_seed
    if seed is not None and (not _is_int(seed) or not 0 <= seed < _MAX_HASH_SEED):
        raise ValueError(f"config field hash_seed must be None or an int in [0, 2**63); got {seed!r}")
    if not isinstance(fields.hidden_act, str) or fields.hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"config field hidden_act must be one of {HIDDEN_ACTS}; got {fields.hidden_act!r}")
    eps = fields.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"config field layer_norm_eps must be a positive float; got {eps!r}")
    for name in ("initializer_range", "axial_norm_std"):
        value = getattr(fields, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ValueError(f"config field {name} must be a non-negative float; got {value!r}")
    for name in ("is_decoder", "tie_word_embeddings", "use_cache", "return_dict"):
        if not isinstance(getattr(fields, name), bool):
            raise TypeError(f"config field {name} must be a bool; got {getattr(fields, name)!r}")
    if fields.tie_word_embeddings:
        raise ValueError(
            "config field tie_word_embeddings must be False: the Reformer LM head maps 2 * hidden_size features "
            "and cannot share the [vocab_size, hidden_size] word embedding"
        )
    vocab_size = fields.vocab_size
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(fields, name)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if any(i is not None and (not _is_int(i) or not 0 <= i < vocab_size) for i in ids):
            raise ValueError(
                f"config field {name} must be None or token ids in [0, config.vocab_size={vocab_size}); got {value!r}"
            )
    if fields.problem_type is not None and fields.problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"config field problem_type must be None or one of {PROBLEM_TYPES}; got {fields.problem_type!r}"
        )
    _dtype_name(fields.dtype)
    if not isinstance(source, Mapping):
        return
    torch_dtype = source.get("torch_dtype")
    if torch_dtype is not None and torch_dtype != "auto":
        _dtype_name(torch_dtype)


class ReformerConfig(transformers.ReformerConfig):
    """transformers' ``ReformerConfig`` whose fields are validated (``ValueError``/``TypeError`` naming the field).

    Keys transformers does not know are kept as attributes and round-trip through config.json, as in
    transformers, except keys that would shadow an attribute or method of the class (``{"validate": true}``),
    which are refused.
    """

    def __init__(self, **kwargs: Any) -> None:
        fields = {field.name for field in self.__dataclass_fields__.values()}
        for name in kwargs:
            attribute = getattr(type(self), name, None)
            read_only = isinstance(attribute, property) and attribute.fset is None
            if name not in fields and (read_only or (callable(attribute) and not isinstance(attribute, type))):
                raise ValueError(f"config key {name!r} would shadow ReformerConfig.{name}; it cannot be a config field")
        if "dtype" in kwargs and kwargs["dtype"] == "auto":
            raise ValueError("config field dtype must name a torch dtype, not 'auto'")
        validate_reformer_fields(kwargs)
        # derived from attn_layers (transformers would let a stale stored value win and build that many layers)
        kwargs.pop("num_hidden_layers", None)
        try:
            super().__init__(**kwargs)
        except StrictDataclassError as error:
            raise TypeError(f"config field: {error}") from error

    def validate(self) -> None:
        """Check every field (transformers' own checks, then this package's); raises naming the first bad one."""
        super().validate()
        validate_reformer_fields(self)

    # the chunk lengths the model pads to / checks against
    def least_common_mult_chunk_length(self) -> int:
        """LCM of the chunk lengths of the attention types in use (transformers' rule)."""
        return math.lcm(*(getattr(self, f"{kind}_attn_chunk_length") for kind in set(self.attn_layers)))

    def min_chunk_length(self) -> int:
        return min(getattr(self, f"{kind}_attn_chunk_length") for kind in set(self.attn_layers))


def as_reformer_config(config: Any) -> ReformerConfig:
    """``config`` as this package's ``ReformerConfig`` (a transformers ``ReformerConfig`` is converted)."""
    if isinstance(config, ReformerConfig):
        return config
    if isinstance(config, transformers.ReformerConfig):
        return ReformerConfig.from_dict(config.to_dict())
    raise TypeError(f"config must be a ReformerConfig; got {type(config).__name__}")


__all__ = ["ReformerConfig", "as_reformer_config", "validate_reformer_fields"]
