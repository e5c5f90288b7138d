"""Triton chunked LSH / local attention against the PyTorch reference: forward, gradients, dropout.

Without a GPU the kernels run in the Triton interpreter (``tests/conftest.py``). Both backends get
the same visiting order (random permutations per round, or the torch ``lsh_hash``/``bucket_sort``
ops), so hashing ties cannot make them differ.

Tolerance rule: in fp32 the kernel must match the fp32 reference to ~1e-5. In fp16 the kernel's
max error against the fp32 reference may be at most 2x the fp16 reference's error plus ``atol``;
and, because the fp16 reference is badly off in degenerate rows (a token seeing only copies of
itself from several rounds gets its logsumexp rounded to fp16), the kernel must *also* be within
``atol + rtol * |ref|`` of the fp32 reference everywhere.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import reformer_kernels
from reformer_kernels import bucket_sort, chunked_attention, lsh_hash
from reformer_kernels.backend import triton_interpreting
from reformer_kernels.ops.chunked_attention import chunked_attention_reference
from reformer_kernels.ops.lsh_hash import num_buckets_product, rotation_size

tri = importlib.import_module("reformer_kernels.ops.chunked_attention.triton")

BF16_INTERPRETER = pytest.mark.skipif(
    triton_interpreting(),
    reason="bf16 tl.dot / arithmetic / fp32->bf16 casts are silently wrong in the Triton 3.9 interpreter; runs on GPU",
)

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 5e-3, 5e-3, id="fp16"),
    pytest.param(torch.bfloat16, 4e-2, 2e-2, id="bf16", marks=BF16_INTERPRETER),
]

# (mode, B, H, L, D, R, chunk, before, after, causal, padding)
CASES = [
    ("local", 2, 2, 48, 16, 1, 16, 1, 0, False, None),
    ("local", 2, 1, 80, 16, 1, 16, 1, 1, True, "left"),
    ("local", 1, 2, 48, 32, 1, 16, 0, 0, True, "right"),
    ("lsh", 2, 2, 48, 16, 1, 16, 1, 0, False, None),
    ("lsh", 2, 1, 80, 16, 2, 16, 1, 0, True, "left"),
    ("lsh", 1, 2, 48, 16, 4, 16, 2, 1, True, "both"),
    ("lsh", 2, 1, 48, 32, 2, 16, 0, 1, False, "right"),
    # window wider than all chunks: chunks appear more than once in a window
    ("lsh", 1, 1, 32, 16, 1, 16, 2, 1, False, "right"),
    # the two other combinations the op allows: a visiting order with separate keys, and
    # shared-QK keys in the identity order
    ("lsh-sepkey", 1, 2, 48, 16, 2, 16, 1, 0, True, "right"),
    ("local-sharedqk", 2, 1, 48, 16, 1, 16, 1, 0, True, "left"),
    # chunk lengths that are not powers of two: rows and keys padded up to the block, padding keys
    # must not count at all (unlike masked keys, which get the finite replacement values)
    ("local", 1, 1, 60, 16, 1, 10, 2, 1, True, "left"),
    ("lsh", 1, 2, 48, 16, 2, 24, 1, 0, True, "right"),
    ("lsh", 1, 1, 74, 24, 2, 37, 1, 1, False, "both"),
    # sequences no longer than a chunk, as the model calls them: full attention, chunk = L, with
    # odd lengths and head dims (head_dim padded up to the block with masked columns)
    ("local", 1, 2, 10, 16, 1, 10, 0, 0, True, "right"),
    ("local", 2, 1, 50, 40, 1, 50, 0, 0, False, None),
    ("local-sharedqk", 2, 1, 37, 24, 1, 37, 0, 0, False, "left"),
    ("local-sharedqk", 1, 2, 50, 16, 1, 50, 0, 0, True, "both"),
]


def _case_id(case):
    mode, B, H, L, D, R, chunk, before, after, causal, padding = case
    direction = "causal" if causal else "bidir"
    return f"{mode}-B{B}-H{H}-L{L}-D{D}-R{R}-c{chunk}-b{before}a{after}-{direction}-{padding or 'nopad'}"


def _random_order(B, H, R, L, device):
    """Round-major visiting order: an independent random permutation of the positions per round."""
    order = torch.stack([torch.randperm(L) + r * L for _ in range(B * H) for r in range(R)])  # [B*H*R, L]
    return order.view(B, H, R * L).to(device)


def _padding(kind, B, L, device):
    if kind is None:
        return None
    mask = torch.ones(B, L, dtype=torch.long)
    if kind in ("left", "both"):
        # with causal attention the first tokens of batch 0 see no key at all: fully masked rows
        mask[0, : L // 2 - 3] = 0
    if kind in ("right", "both"):
        mask[-1, -7:] = 0
    return mask.to(device)


def _make(case, device):
    mode, B, H, L, D, R, chunk, before, after, causal, padding = case
    query = torch.randn(B, H, L, D, device=device)
    shared_qk = mode in ("lsh", "local-sharedqk")
    key = None if shared_qk else torch.randn(B, H, L, D, device=device)
    value = torch.randn(B, H, L, D, device=device)
    sorted_idx = _random_order(B, H, R, L, device) if mode.startswith("lsh") else None
    mask = _padding(padding, B, L, device)
    return (query, key, value), sorted_idx, mask, (chunk, before, after, causal)


def _run(backend, tensors, dtype, grad_out, sorted_idx, mask, window, dropout_p=0.0):
    """Output and input gradients (as fp32) on ``tensors`` cast to ``dtype``.

    ``backend="triton"``: the public op with the Triton backend; ``"reference"``: the specification
    (``chunked_attention_reference``; the op's ``torch`` backend runs a different, blocked path).
    """
    inputs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    if backend == "reference":
        out, _ = chunked_attention_reference(inputs[0], inputs[1], inputs[2], sorted_idx, *window, mask, dropout_p)
    else:
        with reformer_kernels.backend(backend):
            out, _ = chunked_attention(inputs[0], inputs[1], inputs[2], sorted_idx, *window, mask, dropout_p)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return [out.float()] + [g.float() for g in grads]


def _assert_rule(kernel, gold, low, atol, rtol, names):
    for k, g, lo, name in zip(kernel, gold, low, names):
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        err = (k - g).abs().max().item()
        low_err = (lo - g).abs().max().item()
        assert err <= 2 * low_err + atol, (
            f"{name}: kernel error {err:.3e} > 2 x low-precision reference error {low_err:.3e} + {atol}"
        )
        torch.testing.assert_close(k, g, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _names(tensors):
    return ["out", "d_query"] + (["d_key"] if tensors[1] is not None else []) + ["d_value"]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case, dtype, atol, rtol, device):
    tensors, sorted_idx, mask, window = _make(case, device)
    grad_out = torch.randn_like(tensors[0])
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    low = gold if dtype == torch.float32 else _run("reference", tensors, dtype, grad_out, sorted_idx, mask, window)
    kernel = _run("triton", tensors, dtype, grad_out, sorted_idx, mask, window)
    _assert_rule(kernel, gold, low, atol, rtol, _names(tensors))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
@pytest.mark.parametrize("num_hashes,num_buckets", [(2, 4), (4, [2, 2])], ids=["R2-nb4", "R4-nb2x2"])
def test_matches_reference_with_lsh_buckets(num_hashes, num_buckets, dtype, atol, rtol, device):
    """The visiting order of real LSH: torch lsh_hash + bucket_sort (with padding), causal."""
    B, H, L, D, chunk = 2, 2, 48, 16, 16
    query, value = torch.randn(B, H, L, D, device=device), torch.randn(B, H, L, D, device=device)
    mask = _padding("right", B, L, device)
    rotations = torch.randn(H, D, num_hashes, rotation_size(num_buckets), device=device)
    with reformer_kernels.backend("torch"):
        # the torch hashing and sorting ops (the visiting order is an input of the attention op)
        buckets = lsh_hash(query, rotations, num_buckets, mask)
        sorted_idx, _ = bucket_sort(buckets, num_hashes * (num_buckets_product(num_buckets) + 1))
    window = (chunk, 1, 0, True)
    grad_out = torch.randn_like(query)
    tensors = (query, None, value)
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    low = gold if dtype == torch.float32 else _run("reference", tensors, dtype, grad_out, sorted_idx, mask, window)
    kernel = _run("triton", tensors, dtype, grad_out, sorted_idx, mask, window)
    _assert_rule(kernel, gold, low, atol, rtol, _names(tensors))


@pytest.mark.parametrize("mode", ["local", "lsh"])
def test_split_rows_window_and_head_dim(mode, device, monkeypatch):
    """The GPU splits a chunk longer than 128 rows over several programs, walks the window in
    blocks, and splits the backward accumulators into head_dim slices of 64; here the same code
    paths at small sizes: chunk 40 in programs of 16 rows (the last one partial), window blocks of
    16, head_dim 40 in slices of 16 (the last one partial)."""
    monkeypatch.setattr(tri, "_MAX_ROWS", 16)
    monkeypatch.setattr(tri, "_MAX_BLOCK", 16)
    monkeypatch.setattr(tri, "_MAX_DV", 16)
    assert tri.launch_config("dkv", 40, 40) == (16, 16, 16, 1)
    # right padding: no fully masked row, whose output is the sum of its whole window (|out| ~ 50
    # here, beyond what an absolute fp32 tolerance of 1e-5 measures; test_degenerate_rows has them)
    case = (mode, 1, 1, 80, 40, 2 if mode == "lsh" else 1, 40, 1, 0, True, "right")
    tensors, sorted_idx, mask, window = _make(case, device)
    grad_out = torch.randn_like(tensors[0])
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    kernel = _run("triton", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    _assert_rule(kernel, gold, gold, 1e-5, 1e-5, _names(tensors))


def test_full_attention_longer_than_128_rows(device):
    """L = 300 <= chunk (shared-QK full attention, causal, padding): 3 programs of 128 rows per
    chunk on the GPU configuration, no chunk length limit."""
    case = ("local-sharedqk", 1, 1, 300, 16, 1, 300, 0, 0, True, "right")
    tensors, sorted_idx, mask, window = _make(case, device)
    assert tri.launch_config("fwd", 16, 300)[0] == 128
    grad_out = torch.randn_like(tensors[0])
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    kernel = _run("triton", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    _assert_rule(kernel, gold, gold, 1e-5, 1e-5, _names(tensors))


@pytest.mark.parametrize("mode", ["local", "lsh"])
def test_model_layout_is_read_in_place(mode, device):
    """q/k/v as the model passes them, [B, L, H, D] buffers viewed as [B, H, L, D]: the kernels read
    them through their strides (no copy), the output gets the same layout, and a strided output
    gradient is read in place too."""
    B, H, L, D, R, chunk = 2, 2, 48, 16, 2 if mode == "lsh" else 1, 16

    def heads_view():
        return torch.randn(B, L, H, D, device=device).transpose(1, 2)

    query, value = heads_view(), heads_view()
    key = None if mode == "lsh" else heads_view()
    sorted_idx = _random_order(B, H, R, L, device) if mode == "lsh" else None
    mask = _padding("right", B, L, device)
    window = (chunk, 1, 0, True)
    grad_out = torch.randn(B, L, H, D, device=device).transpose(1, 2)
    tensors = (query, key, value)
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)

    leaves = [t.detach().requires_grad_() for t in tensors if t is not None]
    with reformer_kernels.backend("triton"):
        out, _ = chunked_attention(leaves[0], None if key is None else leaves[1], leaves[-1], sorted_idx, *window, mask)
    assert out.stride() == query.stride(), "the output should have the query's [B, L, H, D] layout"
    grads = torch.autograd.grad(out, leaves, grad_out)
    _assert_rule([out] + list(grads), gold, gold, 1e-5, 1e-5, _names(tensors))


def test_degenerate_rows_follow_reference_rounding(device):
    """Fully masked rows return the *sum* of their window's values (fp32 rounding of the
    reference's logsumexp at -1e9), and rows that see only copies of themselves reproduce the
    reference's rounding of lse at -1e5; this needs lse in natural-log units in the kernel."""
    B, H, L, D, R, chunk = 1, 1, 32, 16, 2, 16
    value = torch.randn(B, H, L, D, device=device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[0, :20] = 0
    key = torch.randn(B, H, L, D, device=device)
    query = torch.randn(B, H, L, D, device=device)
    with reformer_kernels.backend("triton"):
        out, _ = chunked_attention(query, key, value, None, chunk, 1, 0, True, mask)
    # local, causal: token 0 sees chunk 0 and (wrapping) chunk 1, all padding or future
    torch.testing.assert_close(out[0, 0, 0], value[0, 0].sum(0), atol=1e-5, rtol=0)
    # the same in full attention over L = 10 keys (padded to a 16-row block): the sum of the 10
    # values, the 6 padding rows of the block take no part
    with reformer_kernels.backend("triton"):
        out, _ = chunked_attention(
            query[..., :10, :], key[..., :10, :], value[..., :10, :], None, 10, 0, 0, True, mask[:, :10]
        )
    torch.testing.assert_close(out[0, 0, 0], value[0, 0, :10].sum(0), atol=1e-5, rtol=0)
    # shared QK, causal: token 0 is the last row of round 0 and the first of round 1, so the window
    # of its round-1 copy holds both copies and nothing else it may see: lse = fl(-1e5 + log 2)
    order = (
        torch.cat([torch.arange(1, L), torch.zeros(1, dtype=torch.long), torch.arange(L) + L])
        .view(1, 1, R * L)
        .to(device)
    )
    with reformer_kernels.backend("triton"):
        out, _ = chunked_attention(query, None, value, order, chunk, 1, 0, True)
    expected, _ = chunked_attention_reference(query, None, value, order, chunk, 1, 0, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the reference itself is 0.2% off the exact value v_0 here; the kernel reproduces that
    assert (expected[0, 0, 0] - value[0, 0, 0]).abs().max() > 1e-4


def test_backward_is_deterministic(device):
    case = ("lsh", 1, 2, 48, 16, 2, 16, 1, 1, True, "both")
    tensors, sorted_idx, mask, window = _make(case, device)
    grad_out = torch.randn_like(tensors[0])
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        results.append(_run("triton", tensors, torch.float32, grad_out, sorted_idx, mask, window, dropout_p=0.2))
    for first, second, name in zip(*results, _names(tensors)):
        assert torch.equal(first, second), f"{name} differs between two identical runs"


def _dropout_reference(monkeypatch, keep, dropout_p):
    """Make the reference's dropout apply ``keep`` (the kernels' mask) instead of drawing its own."""

    def dropout(probs, p, training=True, inplace=False):
        assert p == dropout_p and probs.shape == keep.shape
        return probs * keep.to(probs.dtype) / (1.0 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)


@pytest.mark.parametrize("mode", ["local", "lsh"])
def test_dropout_gradient_is_gradient_of_computed_forward(mode, device, monkeypatch):
    p = 0.3
    case = (mode, 2, 2, 48, 16, 2 if mode == "lsh" else 1, 16, 1, 1, True, "right")
    tensors, sorted_idx, mask, window = _make(case, device)
    B, H, L, _ = tensors[0].shape
    num_rows = L if sorted_idx is None else sorted_idx.shape[-1]
    grad_out = torch.randn_like(tensors[0])

    torch.manual_seed(123)
    seed = tri._draw_seed()
    keep = tri.dropout_keep_mask(B, H, num_rows, *window[:3], p, seed, device=device)
    torch.manual_seed(123)
    kernel = _run("triton", tensors, torch.float32, grad_out, sorted_idx, mask, window, dropout_p=p)

    _dropout_reference(monkeypatch, keep, p)
    gold = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window, dropout_p=p)
    _assert_rule(kernel, gold, gold, 1e-5, 1e-5, _names(tensors))
    # and dropout did something
    plain = _run("reference", tensors, torch.float32, grad_out, sorted_idx, mask, window)
    assert (plain[0] - kernel[0]).abs().max() > 1e-2


def test_dropout_reproducible_for_seed_and_rate_is_p(device):
    p = 0.25
    case = ("lsh", 2, 2, 48, 16, 2, 16, 1, 0, False, None)
    tensors, sorted_idx, mask, window = _make(case, device)

    def forward(seed):
        torch.manual_seed(seed)
        with reformer_kernels.backend("triton"):
            return chunked_attention(tensors[0], None, tensors[2], sorted_idx, *window, mask, p)[0]

    assert torch.equal(forward(1), forward(1))
    assert not torch.equal(forward(1), forward(2))

    B, H, L, _ = tensors[0].shape
    keep = tri.dropout_keep_mask(B, H, sorted_idx.shape[-1], *window[:3], p, 12345, device=device)  # 18432 draws
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - p) < 0.02, f"drop rate {rate:.3f} for p={p}"
    # every (batch, head) has its own stream
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (dict(head_dim=272), ValueError, "head_dim"),
        (dict(dtype=torch.float64), ValueError, "float16, bfloat16 or float32 inputs; got query dtype torch.float64"),
    ],
    ids=["D272", "fp64"],
)
def test_triton_rejects_unsupported_shapes(bad, error, match, device):
    """The ``triton`` backend must not silently fall back to the reference: the kernels' limits raise a
    ValueError that says why (README), float64 included."""
    head_dim, dtype = bad.get("head_dim", 16), bad.get("dtype", torch.float32)
    query = torch.randn(1, 1, 48, head_dim, dtype=dtype, device=device)
    with reformer_kernels.backend("triton"), pytest.raises(error, match=match):
        chunked_attention(query, None, query, None, 16, 1, 0, False)


@pytest.mark.parametrize(
    "head_dim,dtype,chunk,expected",
    [
        (24, torch.float32, 37, True),
        (256, torch.float16, 300, True),
        (272, torch.float32, 16, False),
        (16, torch.float64, 16, False),
    ],
    ids=["D24-c37", "D256-c300", "D272", "fp64"],
)
def test_auto_backend_asks_the_kernel(head_dim, dtype, chunk, expected, monkeypatch):
    """The op hands ``use_triton`` the kernel's own check, so that ``auto`` falls back to PyTorch
    for calls the kernel does not support (CPU tensors never reach the kernel under ``auto``, so
    the callable is captured here)."""
    op = importlib.import_module("reformer_kernels.ops.chunked_attention")
    seen = []

    def use_triton(*tensors, unsupported=None):
        seen.append(None if unsupported is None else unsupported() is None)
        return False

    monkeypatch.setattr(op, "use_triton", use_triton)
    query = torch.randn(1, 1, 2 * chunk, head_dim, dtype=dtype)
    op.chunked_attention(query, None, query, None, chunk, 1, 0, False)
    assert seen == [expected]


def test_kernel_specs_cover_every_kernel():
    """Every kernel of the module has fp16 and bf16 specs whose signatures name exactly its
    arguments, built with the launch configuration the host uses; the attention kernels at
    head_dim 64 / 128 x chunk 64 / 128 in both modes (the AOT test checks them for spills)."""
    specs = tri.kernel_specs()
    kernels = [
        obj for name, obj in vars(tri).items() if name.startswith("chunked_attention_") and name.endswith("_kernel")
    ]
    assert {id(k) for k in kernels} == {id(s.kernel) for s in specs}
    kinds = {
        "chunked_attention_fwd_kernel": "fwd",
        "chunked_attention_bwd_dkv_kernel": "dkv",
        "chunked_attention_bwd_dq_kernel": "dq",
    }
    attention = set()
    for spec in specs:
        fn = getattr(spec.kernel, "fn", spec.kernel)
        args = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        constexprs = [
            a
            for a in args
            if fn.__annotations__.get(a) in ("constexpr", "tl.constexpr")
            or "constexpr" in str(fn.__annotations__.get(a))
        ]
        assert set(spec.constexprs) == set(constexprs), spec.name
        assert set(spec.signature) == set(args) - set(constexprs), spec.name
        kind = kinds.get(fn.__name__)
        assert spec.uses_mma == (kind is not None), spec.name
        if kind is not None:
            tag, dtype, head_dim, chunk = spec.name[spec.name.index("[") + 1 : -1].split(",")
            head_dim, chunk = int(head_dim[1:]), int(chunk[1:])
            block_r, block_w, block_dv, num_warps = tri.launch_config(kind, head_dim, chunk)
            assert (
                spec.constexprs["HEAD_DIM"],
                spec.constexprs["BLOCK_R"],
                spec.constexprs["BLOCK_W"],
                spec.num_warps,
            ) == (head_dim, block_r, block_w, num_warps), spec.name
            assert spec.constexprs.get("BLOCK_DV", block_dv) == block_dv, spec.name
            attention.add((kind, tag, dtype, head_dim, chunk))
    for kind in kinds.values():
        for tag in ("lsh", "local"):
            for head_dim in (64, 128):
                for chunk in (64, 128):
                    assert (kind, tag, "fp16", head_dim, chunk) in attention
    for dtype in ("fp16", "bf16"):
        for name in ("fwd_kernel", "bwd_dkv_kernel", "bwd_dq_kernel", "combine_fwd_kernel", "bwd_preprocess_kernel"):
            assert any(name in s.name and dtype in s.name for s in specs), (name, dtype)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda idx: idx.index_fill_(-1, torch.tensor([3]), 2), r"row \(1, 0\) repeats a value and misses another"),
        (lambda idx: idx.index_fill_(-1, torch.tensor([3]), 96), r"sorted_idx must be in \[0, 96\); got values in"),
        (
            lambda idx: idx.index_fill_(-1, torch.tensor([40]), -5),
            r"sorted_idx must be in \[0, 96\); got values in \[-5,",
        ),
    ],
    ids=["duplicate", "too-large", "negative"],
)
def test_sorted_idx_must_be_a_permutation(corrupt, match, device):
    """Every (batch, head) row of sorted_idx must be a permutation of [0, R * L): checked before any
    launch with the same ValueError on both backends. The kernels read rows through it: duplicates left
    output rows unwritten and out-of-range entries read garbage (values up to 8e32, no error)."""
    if device == "cuda":
        pytest.skip("on CUDA tensors the check is an asynchronous device assert (no host sync)")
    B, H, L, D, R = 2, 1, 48, 16, 2
    query, value = torch.randn(B, H, L, D, device=device), torch.randn(B, H, L, D, device=device)
    order = _random_order(B, H, R, L, device)
    order[0] = torch.randperm(R * L, device=device)  # rounds may mix: any permutation of [0, R * L) is valid
    bad = order.clone()
    corrupt(bad[1])
    messages = set()
    for name in ("torch", "triton"):
        with reformer_kernels.backend(name):
            out, _ = chunked_attention(query, None, value, order, 16, 1, 0, True)
            torch.testing.assert_close(
                out, chunked_attention_reference(query, None, value, order, 16, 1, 0, True)[0], atol=1e-5, rtol=1e-5
            )
            with pytest.raises(ValueError, match=match) as error:
                chunked_attention(query, None, value, bad, 16, 1, 0, True)
            messages.add(str(error.value))
    assert len(messages) == 1


@pytest.mark.skipif(not triton_interpreting(), reason="the refusal is for the Triton interpreter only")
def test_bf16_is_refused_under_the_interpreter():
    """Triton 3.9's interpreter computes bf16 wrongly (errors ~2e9): backend triton refuses bf16 there
    with a ValueError instead of returning garbage; the torch backend computes it (in fp32)."""
    query, value = (torch.randn(1, 1, 32, 16).bfloat16() for _ in range(2))
    with reformer_kernels.backend("triton"), pytest.raises(ValueError, match="bfloat16 .* Triton interpreter"):
        chunked_attention(query, None, value, None, 16, 1, 0, True)
    assert tri.unsupported_reason(query, None, 16, 1, 0) is not None
    with reformer_kernels.backend("torch"):
        out, _ = chunked_attention(query, None, value, None, 16, 1, 0, True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_huge_shared_qk_rows_stay_finite(scale, device):
    """Shared-QK rows with |q| ~ 1e19 and more: mean(q^2) and the raw products q . x overflow fp32.
    The keys are normalised without overflow (a power-of-two rescale, ``reference.key_scale``) on
    every path; the Triton kernels returned NaN, transformers' arithmetic zero keys."""
    from reformer_kernels.ops.chunked_attention import normalize_keys

    B, H, L, D, R = 1, 2, 32, 16, 2
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(B, H, L, D, generator=gen)
    big = torch.rand(B, H, L, 1, generator=gen) < 0.4
    query = torch.where(big, query * scale, query).to(device)  # big and normal rows in the same tiles
    value = torch.randn(B, H, L, D, generator=gen).to(device)
    order = _random_order(B, H, R, L, device)
    mask = _padding("right", B, L, device)
    keys = normalize_keys(query)
    exact = normalize_keys(query.double())
    torch.testing.assert_close(keys.double(), exact, atol=1e-6, rtol=1e-5)  # no zero keys
    grad_out = torch.randn(B, H, L, D, device=device)
    expected = _run("reference", (query, None, value), torch.float32, grad_out, order, mask, (8, 1, 0, True))
    assert all(torch.isfinite(t).all() for t in expected)
    for name in ("torch", "triton"):
        out, dq, dv = _run(name, (query, None, value), torch.float32, grad_out, order, mask, (8, 1, 0, True))
        torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5, msg=f"{name} out")
        # the gradients recompute the probabilities from scores of size ~scale, which agree with the
        # forward's only to fp32 rounding (~1e-7 * scale, far more than 1): finite is what they promise here
        assert torch.isfinite(dq).all() and torch.isfinite(dv).all(), name
