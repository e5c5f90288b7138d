"""Decode attention op: the Triton kernel and the fast PyTorch path against the PyTorch reference, the reference
against a direct computation, the degenerate rows, and bad input (the same errors on both backends).

Without a GPU the kernel runs in the Triton interpreter (``tests/conftest.py``). Tolerance rule (as
tests/ops/test_chunked_attention.py): in fp32 the kernel matches the fp32 reference to ~1e-5; in fp16 its max
error against the fp32 reference is at most 2x the fp16 reference's error plus ``atol``.
"""

from __future__ import annotations

import math

import pytest
import torch

import reformer_kernels
from reformer_kernels.backend import triton_interpreting
from reformer_kernels.ops.decode_attention import decode_attention, decode_attention_reference, torch_fast

pytestmark = pytest.mark.skipif(not reformer_kernels.triton_available(), reason="Triton is not installed")

BF16_INTERPRETER = pytest.mark.skipif(
    triton_interpreting(),
    reason="bf16 arithmetic / fp32->bf16 casts are silently wrong in the Triton 3.9 interpreter; runs on GPU",
)

DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16", marks=BF16_INTERPRETER),
]

# (B, H, N, D, R, T, shared_qk, key_start, self_index, index dtype)
CASES = {
    "B1-H1-N5-D7-R1-T3-lsh": (1, 1, 5, 7, 1, 3, True, False, True, torch.int64),
    "B2-H3-N50-D20-R3-T37-lsh-mask": (2, 3, 50, 20, 3, 37, True, True, True, torch.int32),
    "B3-H2-N130-D64-R4-T128-lsh": (3, 2, 130, 64, 4, 128, True, False, True, torch.int32),
    "B2-H1-N17-D100-R2-T65-lsh-dup": (2, 1, 17, 100, 2, 65, True, True, True, torch.int64),
    "B2-H2-N40-D16-R1-T25-local": (2, 2, 40, 16, 1, 25, False, True, False, torch.int64),
    "B1-H3-N9-D33-R1-T9-local": (1, 3, 9, 33, 1, 9, False, False, False, torch.int32),
    "B2-H2-N70-D24-R2-T50-sep-self": (2, 2, 70, 24, 2, 50, False, True, True, torch.int64),
}


def _inputs(case: str, dtype=torch.float32, device="cpu", seed: int = 0):
    batch, heads, rows, head_dim, rounds, window, shared, with_start, with_self, index_dtype = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, head_dim, generator=generator)
    key = torch.randn(batch, heads, rows, head_dim, generator=generator)
    value = torch.randn(batch, heads, rows, head_dim, generator=generator)
    # rows > window: distinct rows; otherwise rows repeat in a window (the wrapped LSH window)
    index = torch.randint(0, rows, (batch, heads, rounds, window), generator=generator).to(index_dtype)
    key_start = torch.randint(0, window, (batch,), generator=generator) if with_start else None
    self_index = torch.randint(0, rows, (batch,), generator=generator) if with_self else None
    if self_index is not None:
        # the query's own row is in every window (as in a decoding step)
        index[..., -1] = self_index.view(-1, 1, 1).to(index_dtype)
    tensors = [t.to(dtype) for t in (query, key, value)]
    tensors = [t.to(device) for t in tensors]
    extra = [None if t is None else t.to(device) for t in (index, key_start, self_index)]
    return (*tensors, extra[0], shared, extra[1], extra[2])


def _direct(query, key, value, index, shared, key_start, self_index) -> torch.Tensor:
    """The op written out with loops in float64 (the specification, independent of the reference's tensor code)."""
    batch, heads, head_dim = query.shape
    rounds, window = index.shape[2:]
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            outs, lses = [], []
            for r in range(rounds):
                scores, vals = [], []
                for t in range(window):
                    row = int(index[b, h, r, t])
                    x = key[b, h, row].double()
                    k = (
                        x / math.sqrt(float((x * x).mean()) + 1e-6) / math.sqrt(head_dim)
                        if shared
                        else x / math.sqrt(head_dim)
                    )
                    s = float(query[b, h].double() @ k)
                    if key_start is not None and t < int(key_start[b]):
                        s = -1e9
                    if self_index is not None and row == int(self_index[b]):
                        s = -1e5
                    scores.append(s)
                    vals.append(value[b, h, row].double())
                scores = torch.tensor(scores, dtype=torch.float64)
                lse = torch.logsumexp(scores, 0)
                outs.append((torch.exp(scores - lse)[:, None] * torch.stack(vals)).sum(0))
                lses.append(lse)
            lses = torch.stack(lses)
            weights = torch.exp(lses - torch.logsumexp(lses, 0))
            out[b, h] = sum(w * o for w, o in zip(weights, outs))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_direct_computation(case):
    inputs = _inputs(case)
    expected = _direct(*inputs)
    actual = decode_attention_reference(*inputs)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert (actual.double() - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_equals_reference(case, dtype, atol, device):
    inputs = _inputs(case, dtype, device)
    reference = decode_attention_reference(*_inputs(case, torch.float32, device)).float()
    with reformer_kernels.backend("triton"):
        actual = decode_attention(*inputs)
    assert actual.dtype == dtype and actual.shape == reference.shape
    error = (actual.float() - reference).abs().max().item()
    if dtype == torch.float32:
        assert error <= atol, error
    else:
        low_precision = (decode_attention_reference(*inputs).float() - reference).abs().max().item()
        assert error <= 2 * low_precision + atol, (error, low_precision)


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values ``[B, H, N, D]`` in another memory layout."""
    if layout == "model-view":
        # the model's [B, N, H, D] projections viewed as [B, H, N, D]
        return tensor.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded-rows":
        # rows of D + 3 elements: no [rows, D] view of the memory, the gather fallback
        wide = tensor.new_zeros(*tensor.shape[:-1], tensor.shape[-1] + 3)
        wide[..., : tensor.shape[-1]] = tensor
        return wide[..., : tensor.shape[-1]]
    return tensor


@pytest.mark.parametrize("window", ["per-head", "shared"])
@pytest.mark.parametrize("layout", ["contiguous", "model-view", "padded-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_equals_reference(case, dtype, layout, window):
    """The ``torch`` backend's fast path (``torch_fast``) is the reference up to rounding, in every layout (both
    compute in fp32 whatever the input dtype), for a window per (row, head) and for one window every (row, head)
    shares (an index expanded over them, as a local step passes it: read along the row dim)."""
    query, key, value, index, *rest = _inputs(case, dtype)
    if window == "shared":
        index = index[:1, :1].expand(index.shape)
        assert torch_fast._shared_window(index) is not None
    else:
        assert index.shape[:2] == (1, 1) or torch_fast._shared_window(index) is None
    rest = [index, *rest]
    expected = decode_attention_reference(query, key, value, *rest)
    with reformer_kernels.backend("torch"):
        actual = decode_attention(query, _layout(key, layout), _layout(value, layout), *rest)
    assert actual.dtype == dtype
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared", [True, False], ids=["lsh", "local"])
@pytest.mark.parametrize("batch", [1, 3])
def test_window_passed_itself(batch, shared, backend, device):
    """``index=None``: key/value are the window (a slice of a larger cache buffer, as a CPU local step passes it),
    every row in order: the same as the whole buffer read through the index of those positions (the direct
    computation checks the reference's meaning of it)."""
    if backend == "torch" and device != "cpu":
        pytest.skip("the torch backend's fast path is checked on CPU tensors")
    generator = torch.Generator().manual_seed(batch)
    heads, capacity, head_dim, start, window = 2, 90, 24, 31, 41
    key = torch.randn(batch, heads, capacity, head_dim, generator=generator).to(device)
    value = torch.randn(batch, heads, capacity, head_dim, generator=generator).to(device)
    query = torch.randn(batch, heads, head_dim, generator=generator).to(device)
    key_start = torch.randint(0, window, (batch,), generator=generator).to(device)
    self_index = torch.full((batch,), window - 1, device=device) if shared else None
    positions = torch.arange(start, start + window, device=device).view(1, 1, 1, -1).expand(batch, heads, 1, -1)
    cache_self = None if self_index is None else self_index + start
    expected = decode_attention_reference(query, key, value, positions, shared, key_start, cache_self)
    direct = _direct(query.cpu(), key.cpu(), value.cpu(), positions.cpu(), shared, key_start.cpu(), cache_self)
    assert (expected.cpu().double() - direct).abs().max().item() <= 1e-5
    window_keys, window_values = key[:, :, start : start + window], value[:, :, start : start + window]
    reference = decode_attention_reference(query, window_keys, window_values, None, shared, key_start, self_index)
    assert (reference - expected).abs().max().item() <= 1e-6
    with reformer_kernels.backend(backend):
        actual = decode_attention(query, window_keys, window_values, None, shared, key_start, self_index)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5


def test_triton_reads_views_and_expanded_index(device):
    """The model's ``[B, L, H, D] -> [B, H, L, D]`` views and a stride-0 index (one range for every row and head)
    are read in place, as the cache passes them."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, rows, head_dim = 2, 3, 40, 24
    key = torch.randn(batch, rows, heads, head_dim, generator=generator).transpose(1, 2).to(device)
    value = torch.randn(batch, rows, heads, head_dim, generator=generator).transpose(1, 2).to(device)
    query = torch.randn(batch, 1, heads, head_dim, generator=generator).transpose(1, 2)[:, :, 0].to(device)
    index = (torch.arange(30, 40).view(1, 1, 1, -1).expand(batch, heads, 1, -1)).to(device)
    self_index = torch.full((1,), 39).expand(batch).to(device)
    key_start = torch.tensor([0, 4]).to(device)
    expected = decode_attention_reference(query, key, value, index, True, key_start, self_index)
    with reformer_kernels.backend("triton"):
        actual = decode_attention(query, key, value, index, True, key_start, self_index)
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared", [True, False], ids=["lsh", "local"])
def test_fully_masked_rows_keep_transformers_arithmetic(shared, backend, device):
    """Every entry masked (key_start = T) in one row, some in the other: logsumexp([-1e9] * T) rounds to -1e9 in
    fp32, every probability is exp(0) = 1 and the output is the sum of the window's values; the kernel and the
    fast path (whose one round takes softmax) reproduce it."""
    if backend == "torch" and device != "cpu":
        pytest.skip("the torch backend's fast path is checked on CPU tensors")
    query, key, value, index, _, _, _ = _inputs("B2-H2-N40-D16-R1-T25-local", device=device)
    key_start = torch.tensor([25, 7], device=device)
    expected = decode_attention_reference(query, key, value, index, shared, key_start)
    gathered = value.gather(2, index.view(2, 2, -1, 1).expand(-1, -1, -1, 16))
    assert torch.allclose(expected[0], gathered[0].sum(1), atol=1e-4)
    with reformer_kernels.backend(backend):
        actual = decode_attention(query, key, value, index, shared, key_start)
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    query, key, value, index, shared, key_start, self_index = _inputs("B2-H3-N50-D20-R3-T37-lsh-mask")
    good = dict(query=query, key=key, value=value, index=index, shared_qk=shared, key_start=key_start)
    cases = [
        (dict(query=query[0]), ValueError, "query must be a"),
        (dict(query=query.long()), TypeError, "query must be floating point"),
        (dict(key=key[:, :2]), ValueError, "key shape"),
        (dict(value=value[..., :5]), ValueError, "value shape"),
        (dict(value=value[:, :, :7]), ValueError, "value shape .* differs from key shape"),
        (dict(key=key.double()), TypeError, "key dtype"),
        (dict(index=index[0]), ValueError, "index must be None or a"),
        (dict(index=index.float()), TypeError, "index must be an int32 or int64"),
        (dict(index=index[..., :0]), ValueError, "at least one round"),
        (dict(index=index + 50), ValueError, r"index \(the rows of key/value\) must be in \[0, 50\)"),
        (dict(index=index - 1000), ValueError, r"index \(the rows of key/value\) must be in \[0, 50\)"),
        (dict(shared_qk=1), TypeError, "shared_qk must be a bool"),
        (dict(key_start=key_start[:1]), ValueError, "key_start must be a"),
        (dict(key_start=key_start.float()), TypeError, "key_start must be an int32 or int64"),
        (dict(self_index=torch.zeros(3, dtype=torch.long)), ValueError, "self_index must be a"),
        (dict(key=key[:, :, :0], value=value[:, :, :0]), ValueError, "no rows"),
    ]
    with reformer_kernels.backend(backend):
        for change, error, message in cases:
            with pytest.raises(error, match=message):
                decode_attention(**{**good, **change})


def test_kernel_never_reads_rows_out_of_range(device):
    """With the checks skipped (``validate=False``, for callers that build the index), rows outside
    ``[0, N)`` read as zeros in the kernel: the reference over key/value with an extra zero row gives the same."""
    query, key, value, index, shared, key_start, self_index = _inputs("B2-H3-N50-D20-R3-T37-lsh-mask", device=device)
    index = index.clone()
    index[0, 1, 2, 5] = 50
    index[1, 0, 0, 7] = 1 << 30
    index[1, 2, 1, 0] = -3
    with reformer_kernels.backend("triton"):
        actual = decode_attention(query, key, value, index, shared, key_start, self_index, validate=False)
    zero_row = key.new_zeros(2, 3, 1, 20)
    clamped = torch.where((index < 0) | (index >= 50), 50, index)
    expected = decode_attention_reference(
        query, torch.cat([key, zero_row], 2), torch.cat([value, zero_row], 2), clamped, shared, key_start, self_index
    )
    assert (actual - expected).abs().max().item() <= 1e-5


def test_triton_limits_are_reported(device):
    from reformer_kernels.ops.decode_attention import triton as tri

    query, key, value, index, *_ = _inputs("B1-H1-N5-D7-R1-T3-lsh", device=device)
    assert tri.unsupported_reason(query, key, value, index) is None
    assert "Triton decode kernel" in tri.unsupported_reason(query.double(), key.double(), value.double(), index)
    with reformer_kernels.backend("triton"), pytest.raises(ValueError, match="Triton decode kernel"):
        decode_attention(query.double(), key.double(), value.double(), index, True)
    wide = torch.zeros(1, 1, 300, device=device)
    assert tri.unsupported_reason(wide, torch.zeros(1, 1, 2, 300, device=device), torch.zeros(1, 1, 2, 300), index)
    with reformer_kernels.backend("auto"):
        # auto falls back to PyTorch where the kernel does not apply
        out = decode_attention(query.double(), key.double(), value.double(), index, True)
    assert out.dtype == torch.float64


def test_row_bases_memo_is_bounded_and_correct():
    """The fast path's memo of row bases: right values for every (batch, heads, strides), and bounded however many
    cache capacities and batch sizes a long-running process sees."""
    torch_fast._ROW_BASES.clear()
    for batch_size in range(1, 5):
        for capacity in range(1, 40):
            bases = torch_fast._row_bases(batch_size, 3, 3 * capacity, capacity, torch.device("cpu"))
            batch_part = torch.arange(batch_size).view(-1, 1, 1, 1) * 3 * capacity  # [B, 1, 1, 1]
            assert torch.equal(bases, batch_part + torch.arange(3).view(1, -1, 1, 1) * capacity)
            assert len(torch_fast._ROW_BASES) <= torch_fast._MAX_MEMO
