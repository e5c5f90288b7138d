"""ReformerConfig: transformers' fields and defaults, config.json both ways, validation naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from model_testing import tiny_config

from reformer import ReformerConfig

# keys PretrainedConfig adds that are bookkeeping rather than model configuration
_BOOKKEEPING = {"transformers_version", "_name_or_path", "output_attentions"}


def _normalise(value):
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


def test_defaults_equal_transformers():
    import transformers

    theirs = transformers.ReformerConfig().to_dict()
    ours = ReformerConfig().to_dict()
    compared = 0
    for key, value in theirs.items():
        if key in _BOOKKEEPING:
            continue
        assert key in ours, f"missing field {key}"
        assert _normalise(ours[key]) == _normalise(value), key
        compared += 1
    assert compared >= 40
    assert ours["output_attentions"] is False and ours["num_hidden_layers"] == 6


def test_transformers_config_json_roundtrip(tmp_path):
    import transformers

    kwargs = tiny_config(
        attn_layers=["lsh", "local"], num_buckets=[2, 4], num_labels=3, problem_type="single_label_classification"
    )
    transformers.ReformerConfig(**kwargs).save_pretrained(tmp_path / "hf")
    stored = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = ReformerConfig.from_pretrained(tmp_path / "hf")
    for key, value in stored.items():
        if key in _BOOKKEEPING or key == "id2label":
            continue
        assert _normalise(getattr(ours, key)) == _normalise(value), key
    assert ours.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and ours.num_labels == 3
    # the unknown key transformers wrote is kept and written back
    assert ours.transformers_version == stored["transformers_version"]

    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.ReformerConfig.from_pretrained(tmp_path / "ours")
    for key, value in ours.to_dict().items():
        if key in _BOOKKEEPING:
            continue
        assert _normalise(getattr(theirs, key)) == _normalise(value), key


def test_unknown_keys_kept(tmp_path):
    config = ReformerConfig(custom_field={"a": 1}, **tiny_config())
    config.another = 5
    config.save_pretrained(tmp_path)
    loaded = ReformerConfig.from_pretrained(tmp_path)
    assert loaded.custom_field == {"a": 1} and loaded.another == 5
    assert _normalise(loaded.to_diff_dict()) == _normalise(config.to_diff_dict())


def test_legacy_torch_dtype_and_num_hidden_layers():
    config = ReformerConfig(
        torch_dtype="float16",
        num_hidden_layers=99,
        attn_layers=["lsh"],
        **{k: v for k, v in tiny_config().items() if k != "attn_layers"},
    )
    assert config.dtype == torch.float16 and config.num_hidden_layers == 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(axial_pos_embds_dim=[12, 12]), "axial_pos_embds_dim"),
        (dict(axial_pos_shape=[4, 8, 2]), "axial_pos_shape"),
        (dict(num_buckets=[2, 3]), "num_buckets"),
        (dict(num_buckets=5), "num_buckets"),
        (dict(attn_layers=["lsh", "global"]), "attn_layers"),
        (dict(attn_layers=[]), "attn_layers"),
        (dict(lsh_attn_chunk_length=0), "lsh_attn_chunk_length"),
        (dict(local_num_chunks_before=-1), "local_num_chunks_before"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(hidden_act="gelu_weird"), "hidden_act"),
        (dict(num_hashes=0), "num_hashes"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(hash_seed=1.5), "hash_seed"),
        (dict(dtype="float99"), "dtype"),
        (dict(dtype="auto"), "dtype"),
        (dict(pad_token_id=37), "pad_token_id"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(eos_token_id=[2, 40]), "eos_token_id"),
        (dict(hash_seed=2**63), "hash_seed"),
        (dict(hidden_size="32"), "hidden_size"),
        (dict(validate=True), "validate"),
        (dict(to_dict=1), "to_dict"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_invalid_config_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ReformerConfig(**tiny_config(**overrides))


def test_axial_dims_ignored_without_axial_embeddings():
    config = ReformerConfig(**tiny_config(axial_pos_embds=False, axial_pos_embds_dim=[1, 1]))
    assert config.axial_pos_embds is False


def test_validation_reruns_when_the_model_is_built():
    import reformer

    config = ReformerConfig(**tiny_config())
    config.num_buckets = [4, 7]
    with pytest.raises(ValueError, match="num_buckets"):
        reformer.ReformerModel(config)


def test_chunk_length_helpers():
    config = ReformerConfig(
        **tiny_config(attn_layers=["lsh", "local"], lsh_attn_chunk_length=8, local_attn_chunk_length=12)
    )
    assert config.least_common_mult_chunk_length() == 24 and config.min_chunk_length() == 8
    only_local = ReformerConfig(
        **tiny_config(attn_layers=["local"], lsh_attn_chunk_length=8, local_attn_chunk_length=12)
    )
    assert only_local.least_common_mult_chunk_length() == 12
