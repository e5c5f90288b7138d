"""Per-op benchmarks: LSH hash, bucket sort, attention forward and forward+backward, axial embedding.

Each op is timed for this package's backends (``torch`` everywhere, ``triton`` on CUDA), for
transformers' implementation of the same step on the same inputs and, for attention, for dense
causal ``F.scaled_dot_product_attention`` at the same shapes. Every benchmark also checks its
result against transformers or the reference, so a broken implementation fails here too.
"""

from __future__ import annotations

import math

import pytest
import torch

import reformer_kernels
from benchmarks.conftest import BACKENDS, DEVICE
from reformer.bench.harness import attention_inputs
from reformer_kernels import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash
from reformer_kernels.ops.chunked_attention import chunked_attention_reference, normalize_keys
from reformer_kernels.ops.lsh_hash import bucket_factors, num_buckets_product

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("transformers.models.reformer.modeling_reformer")


def _hf_config(config):
    transformers.logging.set_verbosity_error()
    return transformers.ReformerConfig(**config)


def _heads(config, seq_len, batch_size=1):
    heads, head_dim = config["num_attention_heads"], config["attention_head_size"]
    return torch.randn(batch_size, heads, seq_len, head_dim, device=DEVICE)


# ---------------------------------------------------------------- LSH hash


@pytest.mark.parametrize("impl", BACKENDS + ["transformers"])
def test_lsh_hash(benchmark, bench_config, impl):
    config = bench_config
    seq_len = config["max_position_embeddings"]
    vectors = _heads(config, seq_len)
    attention = hf.LSHSelfAttention(_hf_config(config)).to(DEVICE)
    rounds, buckets = config["num_hashes"], config["num_buckets"]
    # transformers reseeds with hash_seed and draws the rotations itself; draw the same ones
    torch.manual_seed(config["hash_seed"])
    rotations = torch.randn(
        config["num_attention_heads"],
        config["attention_head_size"],
        rounds,
        sum(bucket_factors(buckets)) // 2,
        device=DEVICE,
    )
    if impl == "transformers":
        result = benchmark(attention._hash_vectors, vectors, rounds, None)
    else:
        reformer_kernels.set_backend(impl)
        result = benchmark(lsh_hash, vectors, rotations, buckets)
    expected = attention._hash_vectors(vectors, rounds, None)
    assert torch.equal(result.long(), expected.long())


# ---------------------------------------------------------------- bucket sort


@pytest.mark.parametrize("impl", BACKENDS + ["transformers"])
def test_bucket_sort(benchmark, bench_config, impl):
    config = bench_config
    seq_len, rounds = config["max_position_embeddings"], config["num_hashes"]
    bins = num_buckets_product(config["num_buckets"])
    heads = config["num_attention_heads"]
    buckets = (
        torch.randint(0, bins, (1, heads, rounds, seq_len), device=DEVICE)
        + bins * torch.arange(rounds, device=DEVICE).view(1, 1, -1, 1)
    ).view(1, heads, rounds * seq_len)
    attention = hf.LSHSelfAttention(_hf_config(config)).to(DEVICE)
    if impl == "transformers":
        sorted_idx, undo = benchmark(
            attention._get_sorted_bucket_idx_and_undo_sorted_bucket_idx, seq_len, buckets, rounds
        )
    else:
        reformer_kernels.set_backend(impl)
        sorted_idx, undo = benchmark(bucket_sort, buckets.to(torch.int32), rounds * bins)
    expected, expected_undo = attention._get_sorted_bucket_idx_and_undo_sorted_bucket_idx(seq_len, buckets, rounds)
    assert torch.equal(sorted_idx.long(), expected) and torch.equal(undo.long(), expected_undo)


# ---------------------------------------------------------------- attention op


def _dense(inputs):
    query, value = inputs["query"], inputs["value"]
    key = inputs["key"] if inputs["key"] is not None else normalize_keys(query) * math.sqrt(query.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=inputs["causal"])


def _attention_case(config, layer, requires_grad):
    inputs = attention_inputs(config, layer, config["max_position_embeddings"], 1, torch.float32, DEVICE)
    for name in ("query", "key", "value"):
        if inputs[name] is not None:
            inputs[name].requires_grad_(requires_grad)
    return inputs


@pytest.mark.parametrize("layer", ["lsh", "local"])
@pytest.mark.parametrize("impl", BACKENDS + ["reference", "dense"])
def test_attention_forward(benchmark, bench_config, layer, impl):
    inputs = _attention_case(bench_config, layer, requires_grad=False)
    if impl == "dense":
        out = benchmark(_dense, inputs)
        assert out.shape == inputs["query"].shape and torch.isfinite(out).all()
        return
    if impl == "reference":
        out, _ = benchmark(chunked_attention_reference, **inputs)
    else:
        reformer_kernels.set_backend(impl)
        out, _ = benchmark(chunked_attention, **inputs)
    expected, _ = chunked_attention_reference(**inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["lsh", "local"])
@pytest.mark.parametrize("impl", BACKENDS + ["reference", "dense"])
def test_attention_forward_backward(benchmark, bench_config, layer, impl):
    inputs = _attention_case(bench_config, layer, requires_grad=True)
    leaves = [inputs[name] for name in ("query", "key", "value") if inputs[name] is not None]
    grad_out = torch.randn_like(inputs["query"])

    def run(fn):
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(grad_out)
        return [leaf.grad.clone() for leaf in leaves]

    if impl == "dense":
        grads = benchmark(run, lambda: _dense(inputs))
        assert all(torch.isfinite(g).all() for g in grads)
        return
    if impl == "reference":
        grads = benchmark(run, lambda: chunked_attention_reference(**inputs)[0])
    else:
        reformer_kernels.set_backend(impl)
        grads = benchmark(run, lambda: chunked_attention(**inputs)[0])
    expected = run(lambda: chunked_attention_reference(**inputs)[0])
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["lsh", "local"])
@pytest.mark.parametrize("impl", ["ours", "transformers"])
def test_attention_layer(benchmark, bench_config, layer, impl):
    """A whole attention layer (projections, hash, sort, attention) on the same weights."""
    config = _hf_config(bench_config)
    module_class = hf.LSHSelfAttention if layer == "lsh" else hf.LocalSelfAttention
    module = module_class(config, layer_idx=0).to(DEVICE).eval()
    hidden = torch.randn(1, bench_config["max_position_embeddings"], config.hidden_size, device=DEVICE)
    with torch.no_grad():
        expected = module(hidden).hidden_states
        if impl == "ours":
            reformer_kernels.patch_transformers(module)
        try:
            out = benchmark(lambda: module(hidden).hidden_states)
        finally:
            reformer_kernels.unpatch_transformers(module)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- axial position embedding


@pytest.mark.parametrize("impl", BACKENDS + ["transformers"])
def test_axial_position_embedding(benchmark, bench_config, impl):
    config = _hf_config(bench_config)
    module = hf.AxialPositionEmbeddings(config).to(DEVICE).eval()
    with torch.no_grad():
        for weight in module.weights:
            weight.normal_()
    seq_len = bench_config["max_position_embeddings"]
    position_ids = torch.arange(seq_len, device=DEVICE).unsqueeze(0)
    with torch.no_grad():
        if impl == "transformers":
            out = benchmark(module, position_ids)
        else:
            reformer_kernels.set_backend(impl)
            tables = [w.reshape(w.shape[axis], w.shape[-1]) for axis, w in enumerate(module.weights)]
            out = benchmark(axial_position_embedding, position_ids, tables)
        expected = module(position_ids)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
