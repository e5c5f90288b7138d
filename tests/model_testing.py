"""Helpers shared by the model tests: tiny configs, transformers oracles, comparisons.

transformers is the oracle (test-only). Its models get random non-trivial LayerNorm and position
embedding parameters, are saved with its own ``save_pretrained`` and loaded here with ours.
"""

from __future__ import annotations

import torch

import reformer

TINY = dict(
    vocab_size=37,
    hidden_size=32,
    num_attention_heads=2,
    attention_head_size=12,
    feed_forward_size=40,
    axial_pos_shape=[4, 8],
    axial_pos_embds_dim=[12, 20],
    max_position_embeddings=64,
    lsh_attn_chunk_length=8,
    local_attn_chunk_length=8,
    hash_seed=17,
    hidden_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


def assert_oracle_unpatched() -> None:
    """The oracle must be transformers' own code, not transformers routed through our ops
    (``reformer_kernels.patch_transformers`` swaps class-level forwards)."""
    from transformers.models.reformer import modeling_reformer as theirs

    for cls in (theirs.LSHSelfAttention, theirs.LocalSelfAttention, theirs.AxialPositionEmbeddings):
        assert cls.forward.__module__ == theirs.__name__, (
            f"transformers' {cls.__name__} is patched; the oracle would be our own ops"
        )


def hf_model(class_name: str, seed: int = 0, **config_kwargs):
    """A transformers Reformer with random LayerNorm / position parameters and LM-head decoder bias
    (the unused ``lm_head.bias`` stays 0)."""
    import transformers

    assert_oracle_unpatched()
    torch.manual_seed(seed)
    config = transformers.ReformerConfig(**config_kwargs)
    model = getattr(transformers, class_name)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.5)
            elif "position_embeddings" in name or name.endswith("lm_head.decoder.bias"):
                param.normal_()
    return model


def load_ours(hf, tmp_path, class_name: str | None = None, **overrides):
    directory = tmp_path / "hf_checkpoint"
    if not directory.exists():
        hf.save_pretrained(directory)
    cls = getattr(reformer, class_name or type(hf).__name__)
    return cls.from_pretrained(directory, **overrides)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    denominator = expected.double().norm().item()
    assert denominator > 0, "reference gradient is zero: the comparison would be vacuous"
    return (actual.double() - expected.double()).norm().item() / denominator


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual.double() - expected.double()).abs().max().item()
