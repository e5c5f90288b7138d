"""``ReformerConfig``: the hyper-parameters of a Reformer, read from and written to ``config.json``.

Field names and defaults are those of Hugging Face transformers' ``ReformerConfig`` (plus the common
``PretrainedConfig`` fields that appear in a Reformer ``config.json``), so a checkpoint directory written
by transformers loads here and one written here loads in transformers. Keys this class does not know are
kept as attributes and written back unchanged.

Validation raises ``ValueError`` / ``TypeError`` naming the offending field. It runs at construction and
again when a model is built from the config (``validate()``), since attributes may be changed in between.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

CONFIG_NAME = "config.json"
ATTN_LAYER_TYPES = ("lsh", "local")
# the activations transformers' ACT2FN offers that a Reformer config can name (see ``modeling_reformer.ACT2FN``)
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

# Reformer-specific fields, exactly transformers' defaults (configuration_reformer.py, transformers 5.x).
_REFORMER_DEFAULTS: dict[str, Any] = {
    "attention_head_size": 64,
    "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_norm_std": 1.0,
    "axial_pos_embds": True,
    "axial_pos_shape": [64, 64],
    "axial_pos_embds_dim": [64, 192],
    "chunk_size_lm_head": 0,
    "eos_token_id": 2,
    "feed_forward_size": 512,
    "hash_seed": None,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.05,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "is_decoder": False,
    "layer_norm_eps": 1e-12,
    "local_num_chunks_before": 1,
    "local_num_chunks_after": 0,
    "local_attention_probs_dropout_prob": 0.05,
    "local_attn_chunk_length": 64,
    "lsh_attn_chunk_length": 64,
    "lsh_attention_probs_dropout_prob": 0.0,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "max_position_embeddings": 4096,
    "num_attention_heads": 12,
    "num_buckets": None,
    "num_hashes": 1,
    "vocab_size": 320,
    "tie_word_embeddings": False,
    "use_cache": True,
    "classifier_dropout": None,
    "bos_token_id": None,
    "pad_token_id": 0,
}

# Common PretrainedConfig fields found in Reformer config.json files (``num_labels`` / ``id2label`` /
# ``label2id`` are handled separately: they are one piece of information).
_COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "problem_type": None,
}

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# derived or informational keys: read and ignored (recomputed) or kept verbatim
_DERIVED_KEYS = ("num_hidden_layers", "model_type", "num_labels", "id2label", "label2id", "torch_dtype")


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name != "auto" and not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"config field dtype must name a torch dtype (e.g. 'float32'); got {dtype!r}")
        return name
    raise TypeError(f"config field dtype must be a torch.dtype, a string or None; got {type(dtype).__name__}")


class ReformerConfig:
    """Configuration of a Reformer model (transformers-compatible field names and defaults).

    Every keyword of transformers' ``ReformerConfig`` is accepted with the same default; unknown
    keywords are stored as attributes and round-trip through ``config.json``. ``num_hidden_layers`` is
    always ``len(attn_layers)``.
    """

    model_type = "reformer"
    keys_to_ignore_at_inference = ["past_buckets_states"]

    def __init__(self, **kwargs: Any) -> None:
        for name, default in {**_REFORMER_DEFAULTS, **_COMMON_DEFAULTS}.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        # older config.json files call it torch_dtype
        torch_dtype = kwargs.pop("torch_dtype", None)
        if self.dtype is None and torch_dtype is not None:
            self.dtype = torch_dtype
        self.dtype = _dtype_name(self.dtype)
        self._init_labels(kwargs.pop("num_labels", None), kwargs.pop("id2label", None), kwargs.pop("label2id", None))
        # derived: recomputed from attn_layers; the class attribute model_type is authoritative
        kwargs.pop("num_hidden_layers", None)
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(f"config field model_type must be {self.model_type!r}; got {model_type!r}")
        # unknown keys are kept as attributes and written back by to_dict()
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # labels (num_labels <-> id2label <-> label2id), as PretrainedConfig keeps them
    def _init_labels(self, num_labels, id2label, label2id) -> None:
        if id2label is not None:
            id2label = {int(key): value for key, value in dict(id2label).items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(
                    f"config field num_labels ({num_labels}) disagrees with id2label ({len(id2label)} labels)"
                )
        else:
            count = 2 if num_labels is None else num_labels
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"config field num_labels must be a non-negative int; got {count!r}")
            id2label = {i: f"LABEL_{i}" for i in range(count)}
        self.id2label = id2label
        self.label2id = (
            {label: i for i, label in id2label.items()}
            if label2id is None
            else {k: int(v) for k, v in dict(label2id).items()}
        )

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, count: int) -> None:
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"config field num_labels must be a non-negative int; got {count!r}")
        if count != len(self.id2label):
            self._init_labels(count, None, None)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.attn_layers)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the fields; raises ``ValueError``/``TypeError`` naming the first bad field."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name} must be a positive int; got {value!r}")

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config field {name} must be a non-negative int; got {value!r}")

        def probability(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"config field {name} must be a probability in [0, 1); got {value!r}")

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

        layers = self.attn_layers
        if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ValueError(f"config field attn_layers must be a non-empty list of {ATTN_LAYER_TYPES}; got {layers!r}")
        unknown = sorted({layer for layer in layers if layer not in ATTN_LAYER_TYPES}, key=str)
        if unknown:
            raise ValueError(
                f"config field attn_layers has unknown attention layer types {unknown}; choose from {ATTN_LAYER_TYPES}"
            )
        self.attn_layers = list(layers)

        for kind in set(self.attn_layers):
            positive_int(f"{kind}_attn_chunk_length")
            non_negative_int(f"{kind}_num_chunks_before")
            non_negative_int(f"{kind}_num_chunks_after")

        if not isinstance(self.axial_pos_embds, bool):
            raise TypeError(f"config field axial_pos_embds must be a bool; got {self.axial_pos_embds!r}")
        for name in ("axial_pos_shape", "axial_pos_embds_dim"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
                raise ValueError(f"config field {name} must be a non-empty list of positive ints; got {value!r}")
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
                raise ValueError(f"config field {name} must be a list of positive ints; got {list(value)}")
            setattr(self, name, list(value))
        if self.axial_pos_embds:
            if len(self.axial_pos_shape) != len(self.axial_pos_embds_dim):
                raise ValueError(
                    f"config fields axial_pos_shape {self.axial_pos_shape} and axial_pos_embds_dim "
                    f"{self.axial_pos_embds_dim} must have the same number of axes"
                )
            if sum(self.axial_pos_embds_dim) != self.hidden_size:
                raise ValueError(
                    f"config field axial_pos_embds_dim {self.axial_pos_embds_dim} must sum to config.hidden_size "
                    f"{self.hidden_size}; it sums to {sum(self.axial_pos_embds_dim)}"
                )

        buckets = self.num_buckets
        if buckets is not None:
            factors = [buckets] if isinstance(buckets, int) and not isinstance(buckets, bool) else buckets
            if isinstance(factors, str) or not isinstance(factors, Sequence) or len(factors) == 0:
                raise ValueError(f"config field num_buckets must be None, an int or a list of ints; got {buckets!r}")
            for factor in factors:
                if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2 or factor % 2 != 0:
                    raise ValueError(
                        f"config field num_buckets must contain even ints >= 2 (bucket factors); got {buckets!r}"
                    )
            if not isinstance(buckets, int):
                self.num_buckets = list(buckets)

        if self.hash_seed is not None and (not isinstance(self.hash_seed, int) or isinstance(self.hash_seed, bool)):
            raise ValueError(f"config field hash_seed must be None or an int; got {self.hash_seed!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"config field hidden_act must be one of {HIDDEN_ACTS}; got {self.hidden_act!r}")
        if (
            not isinstance(self.layer_norm_eps, (int, float))
            or isinstance(self.layer_norm_eps, bool)
            or not self.layer_norm_eps > 0
        ):
            raise ValueError(f"config field layer_norm_eps must be a positive float; got {self.layer_norm_eps!r}")
        for name in ("initializer_range", "axial_norm_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"config field {name} must be a non-negative float; got {value!r}")
        for name in (
            "is_decoder",
            "tie_word_embeddings",
            "use_cache",
            "output_hidden_states",
            "output_attentions",
            "return_dict",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config field {name} must be a bool; got {getattr(self, name)!r}")
        if self.tie_word_embeddings:
            raise ValueError(
                "config field tie_word_embeddings must be False: the Reformer LM head maps 2 * hidden_size features "
                "and cannot share the [vocab_size, hidden_size] word embedding"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"config field problem_type must be None or one of {PROBLEM_TYPES}; got {self.problem_type!r}"
            )
        self.dtype = _dtype_name(self.dtype)
        if self.dtype == "auto":
            raise ValueError("config field dtype must name a torch dtype, not 'auto'")

    # ----------------------------------------------------------------------------------------------
    # the chunk lengths the model pads to / checks against
    def least_common_mult_chunk_length(self) -> int:
        """LCM of the chunk lengths of the attention types in use (transformers' rule)."""
        return math.lcm(*(getattr(self, f"{kind}_attn_chunk_length") for kind in set(self.attn_layers)))

    def min_chunk_length(self) -> int:
        return min(getattr(self, f"{kind}_attn_chunk_length") for kind in set(self.attn_layers))

    # ----------------------------------------------------------------------------------------------
    # serialization
    def to_dict(self) -> dict[str, Any]:
        """All fields (plus kept unknown keys) as JSON-ready Python values."""
        out = {name: copy.deepcopy(value) for name, value in vars(self).items() if not name.startswith("_")}
        out["id2label"] = {str(key): value for key, value in self.id2label.items()}
        out["num_hidden_layers"] = self.num_hidden_layers
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> ReformerConfig:
        """Build a config from a dict (e.g. a parsed ``config.json``); ``overrides`` replace entries.

        Overriding ``num_labels`` alone replaces the stored label maps by fresh ``LABEL_i`` names.
        """
        config_dict = dict(config_dict)
        if "num_labels" in overrides and "id2label" not in overrides:
            config_dict.pop("id2label", None)
            config_dict.pop("label2id", None)
        return cls(**{**config_dict, **overrides})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``save_directory`` (created if needed; the file is replaced atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(self.to_json_string())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> ReformerConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle), **overrides)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **overrides: Any) -> ReformerConfig:
        """Read ``config.json`` from a directory (or the path of the json file itself)."""
        path = os.fspath(pretrained_path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} found at {pretrained_path!s} (only local directories are supported)"
            )
        return cls.from_json_file(path, **overrides)

    def has_field(self, name: str) -> bool:
        """True for transformers' Reformer/common fields and for keys this config was given."""
        return name in _REFORMER_DEFAULTS or name in _COMMON_DEFAULTS or name in _DERIVED_KEYS or name in vars(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReformerConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


__all__ = ["CONFIG_NAME", "ReformerConfig"]
