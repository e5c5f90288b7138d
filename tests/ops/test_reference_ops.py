"""The PyTorch reference ops reproduce transformers' LSH and local self-attention exactly."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.reformer.modeling_reformer import LocalSelfAttention, LSHSelfAttention  # noqa: E402

from reformer_kernels import bucket_sort, chunked_attention, lsh_hash  # noqa: E402
from reformer_kernels.ops.lsh_hash import num_buckets_product, rotation_size  # noqa: E402

HIDDEN, HEADS, HEAD_DIM, CHUNK = 32, 2, 16, 4

CASES = [
    # (num_hashes, num_buckets, chunks_before, chunks_after, padded)
    (1, 4, 1, 0, False),
    (3, [2, 4], 2, 1, True),
    (2, 8, 0, 0, True),
    (4, [2, 2, 2], 1, 1, False),
]


def _config(num_hashes, num_buckets, before, after, causal):
    return transformers.ReformerConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        attention_head_size=HEAD_DIM,
        lsh_attn_chunk_length=CHUNK,
        local_attn_chunk_length=CHUNK,
        num_hashes=num_hashes,
        num_buckets=num_buckets,
        lsh_num_chunks_before=before,
        lsh_num_chunks_after=after,
        local_num_chunks_before=before,
        local_num_chunks_after=after,
        hash_seed=3,
        is_decoder=causal,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
    )


def _heads(x):
    return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def _inputs(padded, batch_size=2, seq_len=24):
    hidden = torch.randn(batch_size, seq_len, HIDDEN)
    mask = None
    if padded:
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[1, -5:] = 0
        mask[0, 3] = 0
    return hidden, mask


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    "num_hashes,num_buckets,before,after,padded",
    CASES,
    ids=[f"R{c[0]}-nb{c[1]}-b{c[2]}a{c[3]}-{'pad' if c[4] else 'nopad'}" for c in CASES],
)
def test_lsh_reference_equals_transformers(causal, num_hashes, num_buckets, before, after, padded):
    layer = LSHSelfAttention(_config(num_hashes, num_buckets, before, after, causal), layer_idx=0).eval()
    hidden, mask = _inputs(padded)
    expected = layer(hidden, attention_mask=mask, output_attentions=True)

    query_key, value = _heads(layer.query_key(hidden)), _heads(layer.value(hidden))
    generator = torch.Generator().manual_seed(3)
    rotations = torch.randn((HEADS, HEAD_DIM, num_hashes, rotation_size(num_buckets)), generator=generator)
    buckets = lsh_hash(query_key, rotations, num_buckets, mask)
    assert buckets.dtype == torch.int32
    assert torch.equal(buckets.long(), expected.buckets.flatten(2))
    sorted_idx, undo_idx = bucket_sort(buckets, num_hashes * (num_buckets_product(num_buckets) + 1))
    assert torch.equal(sorted_idx.gather(-1, undo_idx), torch.arange(buckets.shape[-1]).expand_as(sorted_idx))
    out, probs = chunked_attention(
        query_key, None, value, sorted_idx, CHUNK, before, after, causal, mask, return_probs=True
    )
    torch.testing.assert_close(out.transpose(1, 2).flatten(2), expected.hidden_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, expected.attention_probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
    "before,after,padded,seq_len",
    [(1, 0, False, 24), (2, 1, True, 24), (0, 0, True, 24), (1, 1, True, 4)],
    ids=["b1a0", "b2a1-pad", "b0a0-pad", "standard-L4"],
)
def test_local_reference_equals_transformers(causal, before, after, padded, seq_len):
    layer = LocalSelfAttention(_config(1, 4, before, after, causal), layer_idx=0).eval()
    hidden, mask = _inputs(padded, seq_len=seq_len)
    expected = layer(hidden, attention_mask=mask, output_attentions=True)
    query, key, value = (_heads(proj(hidden)) for proj in (layer.query, layer.key, layer.value))
    window = (CHUNK, before, after) if seq_len > CHUNK else (seq_len, 0, 0)
    out, probs = chunked_attention(query, key, value, None, *window, causal, mask, return_probs=True)
    torch.testing.assert_close(out.transpose(1, 2).flatten(2), expected.hidden_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        probs.reshape(expected.attention_probs.shape), expected.attention_probs, atol=1e-6, rtol=0
    )


def test_fp16_mask_values_follow_transformers():
    from reformer_kernels.ops.chunked_attention import mask_values

    assert mask_values(torch.float16) == (-1e4, -1e3)
    assert mask_values(torch.float32) == (-1e9, -1e5)
    assert mask_values(torch.bfloat16) == (-1e9, -1e5)


def test_fully_masked_row_sums_values_and_lonely_token_attends_to_itself():
    query = torch.randn(1, 1, 8, 16)
    value = torch.randn(1, 1, 8, 16)
    mask = torch.zeros(1, 8, dtype=torch.long)
    out, probs = chunked_attention(query, query.clone(), value, None, 8, 0, 0, False, mask, return_probs=True)
    # transformers' arithmetic: logsumexp(-1e9 * ones(8)) rounds to -1e9 in fp32, so every
    # probability is exp(0) = 1 and the row returns the *sum* of the values, not their mean
    assert torch.equal(probs, torch.ones_like(probs))
    torch.testing.assert_close(out[0, 0], value[0, 0].sum(0).expand(8, -1), atol=1e-5, rtol=0)
    # shared-QK, causal: the first token sees only itself
    out, _ = chunked_attention(query, None, value, None, 8, 0, 0, True)
    torch.testing.assert_close(out[0, 0, 0], value[0, 0, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(chunk_length=5), "chunk_length"),
        (dict(num_chunks_before=-1), "num_chunks_before"),
        (dict(attention_mask=torch.ones(2, 7)), "attention_mask"),
        (dict(sorted_idx=torch.zeros(2, 2, 23, dtype=torch.long)), "sorted_idx"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(value=torch.randn(2, 2, 24, 8)), "value"),
    ],
)
def test_attention_rejects_bad_arguments(bad, match):
    args = dict(
        query=torch.randn(2, 2, 24, 16),
        key=None,
        value=torch.randn(2, 2, 24, 16),
        sorted_idx=None,
        chunk_length=4,
        num_chunks_before=1,
        num_chunks_after=0,
        causal=True,
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        chunked_attention(**args)


def test_hash_and_sort_reject_bad_arguments():
    vectors = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="num_buckets"):
        lsh_hash(vectors, torch.randn(2, 16, 1, 2), [3, 4])
    with pytest.raises(ValueError, match="rotations"):
        lsh_hash(vectors, torch.randn(2, 16, 1, 3), 4)
    with pytest.raises(TypeError, match="buckets"):
        bucket_sort(torch.randn(1, 2, 8), 4)
