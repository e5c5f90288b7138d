"""The fast PyTorch attention path (``torch_fast.py``) equals the reference: forward and gradients."""

import sys

import pytest
import torch

from reformer_kernels import backend, chunked_attention
from reformer_kernels.ops.bucket_sort import bucket_sort_reference
from reformer_kernels.ops.chunked_attention import chunked_attention_reference, chunked_attention_with_grad
from reformer_kernels.ops.chunked_attention.torch_fast import chunked_attention_fast

torch_fast = sys.modules["reformer_kernels.ops.chunked_attention.torch_fast"]

# (B, H, L, D, rounds (0 = local, identity order), chunk, before, after, causal, shared_qk, padding, block_rows)
CASES = [
    pytest.param((2, 3, 150, 7, 0, 10, 1, 0, True, False, False, 40), id="B2-H3-L150-local-causal"),
    pytest.param((2, 3, 150, 7, 0, 10, 1, 1, False, False, True, 2048), id="B2-H3-L150-local-pad-after1"),
    pytest.param((1, 2, 96, 16, 1, 8, 1, 0, True, True, False, 24), id="B1-H2-L96-R1-lsh-causal"),
    pytest.param((2, 2, 90, 9, 3, 6, 1, 1, True, True, True, 36), id="B2-H2-L90-R3-lsh-pad-after1"),
    pytest.param((1, 1, 64, 5, 2, 8, 2, 1, False, True, False, 8), id="B1-H1-L64-R2-lsh-before2-blocks1"),
    pytest.param((1, 2, 24, 4, 2, 12, 1, 0, True, True, True, 2048), id="B1-H2-L24-R2-window-wraps"),
    pytest.param((2, 1, 40, 8, 0, 40, 0, 0, True, False, True, 2048), id="B2-H1-L40-single-chunk"),
    # the model's full attention for short inputs: identity order with shared QK (self mask, key norm)
    pytest.param((1, 2, 32, 8, 0, 32, 0, 0, True, True, True, 2048), id="B1-H2-L32-full-shared-qk"),
    pytest.param((2, 2, 48, 8, 0, 8, 1, 1, False, True, False, 16), id="B2-H2-L48-local-order-shared-qk-wraps"),
]


def _inputs(B, H, L, D, rounds, chunk, shared, padding, dtype):
    query = torch.randn(B, H, L, D, dtype=dtype, requires_grad=True)
    key = None if shared else torch.randn(B, H, L, D, dtype=dtype, requires_grad=True)
    value = torch.randn(B, H, L, D, dtype=dtype, requires_grad=True)
    sorted_idx = None
    if rounds:
        # few buckets: many ties (stable order matters) and windows spanning buckets and rounds
        buckets = torch.randint(0, 4, (B, H, rounds, L)) + 4 * torch.arange(rounds).view(1, 1, -1, 1)
        sorted_idx, _ = bucket_sort_reference(buckets.view(B, H, rounds * L))
    mask = None
    if padding:
        mask = (torch.rand(B, L) > 0.3).long()
        mask[0, : L // 3] = 0  # long padded runs give fully masked rows
    return query, key, value, sorted_idx, mask


def _compare(case, dtype, atol, monkeypatch):
    B, H, L, D, rounds, chunk, before, after, causal, shared, padding, block_rows = case
    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", block_rows)
    query, key, value, sorted_idx, mask = _inputs(B, H, L, D, rounds, chunk, shared, padding, dtype)
    args = (sorted_idx, chunk, before, after, causal, mask)
    expected, _ = chunked_attention_reference(query, key, value, *args)
    out = chunked_attention_fast(query, key, value, *args)
    leaves = [t for t in (query, key, value) if t is not None]
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(out, expected, atol=atol, rtol=atol)
    for name, grad, want in zip(("query", "key", "value") if not shared else ("query", "value"), grads, expected_grads):
        torch.testing.assert_close(grad, want, atol=atol, rtol=atol, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_reference(case, dtype, atol, monkeypatch):
    _compare(case, dtype, atol, monkeypatch)


def test_fully_masked_rows_return_the_sum_of_values_like_the_reference():
    # fp32 logsumexp of a row of -1e9 rounds to -1e9: probabilities 1, the row sums its values
    query, key, value = (torch.randn(1, 2, 64, 8) for _ in range(3))
    mask = torch.ones(1, 64, dtype=torch.long)
    mask[:, 16:48] = 0
    expected, _ = chunked_attention_reference(query, key, value, None, 8, 1, 0, False, mask)
    out = chunked_attention_fast(query, key, value, None, 8, 1, 0, False, mask)
    window_sum = value[:, :, 24:40].sum(2)  # row 32 (chunk 4) sees rows 24..39 (chunks 3, 4): all padding
    torch.testing.assert_close(expected[:, :, 32], window_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_torch_backend_dispatches_to_fast_path(monkeypatch):
    calls = []
    original = torch_fast.chunked_attention_fast

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_fast, "chunked_attention_fast", spy)
    query, key, value = (torch.randn(1, 1, 16, 4) for _ in range(3))
    with backend("torch"):
        out, probs = chunked_attention(query, key, value, None, 4, 1, 0, True)
        assert probs is None and calls == [1]
        # return_probs needs the score matrix: the reference path serves it
        out_probs, probs = chunked_attention(query, key, value, None, 4, 1, 0, True, return_probs=True)
        assert probs is not None and calls == [1]
    torch.testing.assert_close(out, out_probs, atol=1e-6, rtol=1e-6)


def test_dropout_is_replayed_in_backward():
    # with the RNG reseeded per call the op is a deterministic function: gradcheck its dropout path
    B, H, L, D = 1, 2, 24, 4
    query = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    value = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    buckets = torch.randint(0, 3, (B, H, 2, L)) + 3 * torch.arange(2).view(1, 1, -1, 1)
    sorted_idx, _ = bucket_sort_reference(buckets.view(B, H, 2 * L))

    def fn(q, v):
        torch.manual_seed(1234)
        return chunked_attention_fast(q, None, v, sorted_idx, 6, 1, 0, True, None, 0.3)

    assert torch.autograd.gradcheck(fn, (query, value), atol=1e-6)
    # dropout is really applied: it changes the output, and its expectation is the undropped one
    no_drop = chunked_attention_fast(query, None, value, sorted_idx, 6, 1, 0, True)
    assert not torch.allclose(fn(query, value), no_drop)


def test_low_precision_inputs_compute_in_fp32():
    query, value = (torch.randn(1, 2, 64, 16) for _ in range(2))
    buckets = torch.randint(0, 4, (1, 2, 64))
    sorted_idx, _ = bucket_sort_reference(buckets)
    exact, _ = chunked_attention_reference(query.double(), None, value.double(), sorted_idx, 8, 1, 0, True)
    low, _ = chunked_attention_reference(query.bfloat16(), None, value.bfloat16(), sorted_idx, 8, 1, 0, True)
    fast = chunked_attention_fast(query.bfloat16(), None, value.bfloat16(), sorted_idx, 8, 1, 0, True)
    assert fast.dtype == torch.bfloat16
    fast_error = (fast.double() - exact).abs().max()
    low_error = (low.double() - exact).abs().max()
    # tolerance rule: at most ~2x the low-precision reference's own error (plus a small atol)
    assert fast_error <= 2 * low_error + 1e-3


def test_worker_threads_match_single_thread_and_survive_fork(monkeypatch):
    # blocks on worker threads (groups of whole sequences), or all on the calling thread with
    # intra-op threads (the default, None), give the same numbers as the calling thread alone
    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", 16)
    query, value = (torch.randn(2, 3, 96, 8, requires_grad=True) for _ in range(2))
    buckets = torch.randint(0, 4, (2, 3, 2 * 96))
    sorted_idx, _ = bucket_sort_reference(buckets)
    grads = {}
    for workers in (1, 2, 4, None):
        monkeypatch.setattr(torch_fast, "WORKERS", workers)
        torch.manual_seed(0)  # the same dropout seed for every run
        out = chunked_attention_fast(query, None, value, sorted_idx, 8, 1, 0, True, None, 0.2)
        grads[workers] = (out, *torch.autograd.grad(out.sum(), (query, value)))
    for other in (2, 4, None):
        for a, b in zip(grads[1], grads[other]):
            assert torch.equal(a, b)
    # a forked child gets its own pool instead of waiting on the parent's (absent) threads
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_child_attention, ()).get(timeout=120) == (2, 2, 96, 8)


def _child_attention():
    torch_fast.WORKERS = 2
    torch_fast.BLOCK_ROWS = 16
    query, value = torch.randn(2, 2, 96, 8), torch.randn(2, 2, 96, 8)
    return tuple(chunked_attention_fast(query, None, value, None, 8, 1, 0, True).shape)


@pytest.mark.parametrize("block_rows", [16, 4096], ids=["per-sequence-blocks", "multi-sequence-blocks"])
def test_backward_is_deterministic_and_layouts_are_kept(block_rows, monkeypatch):
    # the model's layout: [B, L, H, D] buffers viewed as [B, H, L, D]; read in place, output in the
    # same layout; two backward passes are bit-identical (no atomics, fixed block order)
    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", block_rows)
    B, H, L, D = 2, 3, 96, 8
    query, value = (torch.randn(B, L, H, D).transpose(1, 2).requires_grad_() for _ in range(2))
    buckets = torch.randint(0, 4, (B, H, 2, L)) + 4 * torch.arange(2).view(1, 1, -1, 1)
    sorted_idx, _ = bucket_sort_reference(buckets.view(B, H, 2 * L))
    grad_out = torch.randn(B, H, L, D)
    for args in ((query, None, value, sorted_idx, 8, 1, 0, True), (query, value, value, None, 8, 1, 1, True)):
        expected, _ = chunked_attention_reference(*args)
        runs = []
        for _ in range(2):
            out = chunked_attention_fast(*args)
            runs.append((out, *torch.autograd.grad(out, (query, value), grad_out)))
        assert runs[0][0].transpose(1, 2).is_contiguous()  # the query's layout
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b)
        torch.testing.assert_close(runs[0][0], expected, atol=1e-5, rtol=1e-5)
        expected_grads = torch.autograd.grad(expected, (query, value), grad_out)
        for got, want in zip(runs[0][1:], expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_visiting_orders_that_mix_rounds_compare_every_position(monkeypatch):
    # the self mask is the chunk diagonal only when each round visits its own L rows; any other
    # permutation (here: rounds interleaved) must compare positions in every window
    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", 16)
    B, H, L, D, R = 1, 2, 48, 4, 2
    query, value = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sorted_idx = torch.stack([torch.randperm(R * L) for _ in range(B * H)]).view(B, H, R * L)
    args = (sorted_idx, 8, 1, 1, True)
    expected, _ = chunked_attention_reference(query, None, value, *args)
    out = chunked_attention_fast(query, None, value, *args)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (query, value), grad_out), torch.autograd.grad(expected, (query, value), grad_out)
    ):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # (the op checks the order before the fast path runs: validation.check_permutation)
    with backend("torch"), pytest.raises(ValueError, match="sorted_idx must be a permutation"):
        chunked_attention(query, None, value, torch.zeros_like(sorted_idx), 8, 1, 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_with_grad_equals_forward_and_backward(case, dtype, monkeypatch):
    """``chunked_attention_with_grad``: one pass over the blocks for one round (forward + autograd otherwise) gives
    the output and input gradients of the two-pass op; for one round bit for bit (same operations per row)."""
    B, H, L, D, rounds, chunk, before, after, causal, shared, padding, block_rows = case
    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", block_rows)
    fused_calls = []
    original = torch_fast.chunked_attention_fast_with_grad
    monkeypatch.setattr(
        torch_fast, "chunked_attention_fast_with_grad", lambda *a: fused_calls.append(1) or original(*a)
    )
    query, key, value, sorted_idx, mask = _inputs(B, H, L, D, rounds, chunk, shared, padding, dtype)
    args = (sorted_idx, chunk, before, after, causal, mask)
    leaves = [t for t in (query, key, value) if t is not None]
    with backend("torch"):
        expected, _ = chunked_attention(query, key, value, *args)
        grad_out = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, leaves, grad_out)
        out, grads = chunked_attention_with_grad(query, key, value, *args, grad_out)
    assert len(fused_calls) == (1 if rounds <= 1 else 0)
    assert not out.requires_grad and (grads[1] is None) == shared
    names = ("query", "key", "value")
    for name, got, want in zip(
        ("out", *names),
        (out, *grads),
        (expected, *(expected_grads[:1] + ((None,) if shared else ()) + expected_grads[1:])),
    ):
        if want is None:
            continue
        if rounds <= 1:
            assert torch.equal(got, want), f"{name}: max difference {(got - want).abs().max().item():.3e}"
        else:
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_with_grad_checks_grad_out():
    query, value = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="grad_out must have the query's shape"):
        chunked_attention_with_grad(query, None, value, None, 8, 1, 0, True, None, torch.randn(1, 2, 32, 4))


@pytest.mark.parametrize("layout", ["BHLD", "BLHD-view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_norms_in_blocks_equal_normalize_keys(layout, dtype, monkeypatch):
    """Shared QK: the op's per-row 1/rms, computed in row blocks, is the reference's bit for bit
    (L spans several blocks and ends in a partial one; both memory layouts the op reads)."""
    from reformer_kernels.ops.chunked_attention.reference import normalize_keys

    monkeypatch.setattr(torch_fast, "BLOCK_ROWS", 16)
    B, H, L, D = 2, 3, 53, 8
    gen = torch.Generator().manual_seed(3)
    if layout == "BHLD":
        query = torch.randn(B, H, L, D, generator=gen).to(dtype)
    else:
        query = torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2)  # the model's heads view
    problem = torch_fast._Problem(query, None, None, 8, 1, 0, True, True, 0.0, 0)
    rs = torch_fast._key_rs(problem, torch_fast._Rows(query))  # [BH, L]
    q = query.float()
    expected = torch.rsqrt(torch.mean(q**2, dim=-1) + 1e-6).reshape(B * H, L)
    assert torch.equal(rs, expected)
    # and the keys built from it are normalize_keys' (the op divides by sqrt(D) after the product)
    keys = q * rs.view(B, H, L, 1) / D**0.5
    assert torch.equal(keys, normalize_keys(q))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp16_fully_masked_row_returns_the_sum_of_values(backend_name):
    """fp16 inputs, a row whose every key is masked: the sum of its window's values, as the reference,
    the Triton kernels and transformers give (``fl16(-1e4 + log w) == -1e4`` for w <= 54). The fast
    path scores in fp32, where fp16's -1e4 made the row the *mean* of its values; it uses the fp32
    replacement values now."""
    gen = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, 1, 32, 8, generator=gen).half() for _ in range(3))
    mask = torch.ones(1, 32, dtype=torch.long)
    mask[:, :20] = 0
    # local, causal, chunk 8, one chunk back: row 0 sees chunk 3 (wrapping; all future) and chunk 0 (all padding)
    args = (None, 8, 1, 0, True, mask)
    with backend(backend_name):
        out, _ = chunked_attention(query, key, value, *args)
    reference, _ = chunked_attention_reference(query, key, value, *args)
    window_sum = value[0, 0, 24:].float().sum(0) + value[0, 0, :8].float().sum(0)
    torch.testing.assert_close(reference[0, 0, 0].float(), window_sum, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(out[0, 0, 0].float(), window_sum, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=2e-3)
