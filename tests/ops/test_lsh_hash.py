"""Triton LSH hash kernel against the PyTorch reference (Triton interpreter on CPU).

Bucket ids must be equal everywhere except where the argmax is a near-tie: there the top two
entries of ``[xR, -xR]`` (computed in fp64 from the same inputs) are within the rounding error of
the projection, so the reference itself could have gone either way. Only those entries are
excluded, and they must be rare. Exact ties (zero vectors, duplicated rotation columns) are
tested separately with no exclusion: the first maximum must win, as in ``torch.argmax``.
"""

from __future__ import annotations

import pytest
import torch

import reformer_kernels
from reformer_kernels import bucket_sort
from reformer_kernels.ops.lsh_hash import lsh_hash, lsh_hash_reference
from reformer_kernels.ops.lsh_hash.reference import bucket_factors
from reformer_kernels.ops.lsh_hash.triton import is_supported, lsh_hash_triton


def _rotations(num_heads, head_dim, num_rounds, num_buckets, device):
    width = sum(bucket_factors(num_buckets)) // 2
    return torch.randn((num_heads, head_dim, num_rounds, width), device=device)


def _mask(batch_size, seq_len, device, kind):
    if kind == "none":
        return None
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    if kind == "pad":
        # right padding of different lengths, and one padded slot in the middle
        mask[-1, max(1, seq_len - seq_len // 3) :] = 0
        if seq_len > 4:
            mask[0, seq_len // 2] = 0
    return mask  # kind == "ones": a mask without padding


def _near_ties(vectors, rotations, num_buckets):
    """[B, H, R*L] bool: positions whose argmax margin (fp64) is within the projection's rounding."""
    dtype = vectors.dtype
    x = vectors.double()
    rot = rotations.to(dtype).double()
    rotated = torch.einsum("bhld,hdrk->bhrlk", x, rot)  # [B, H, R, L, K]
    magnitude = torch.einsum("bhld,hdrk->bhrlk", x.abs(), rot.abs())  # bound on |summands|
    eps32 = torch.finfo(torch.float32).eps
    # summation in fp32 (any order): |error| <= D * eps32 * sum|x_d r_d|, generously
    sum_tol = vectors.shape[-1] * eps32 * magnitude
    near = torch.zeros(rotated.shape[:-1], dtype=torch.bool)
    column = 0
    for factor in bucket_factors(num_buckets):
        half = rotated[..., column : column + factor // 2]
        tol = sum_tol[..., column : column + factor // 2].amax(-1)
        column += factor // 2
        top2 = torch.cat([half, -half], dim=-1).topk(2, dim=-1).values  # [B, H, R, L, 2]
        if dtype != torch.float32:
            # the reference rounds the projection to the input dtype: one ulp of the maximum
            tol = tol + 2 * torch.finfo(dtype).eps * top2[..., 0].abs()
        near |= (top2[..., 0] - top2[..., 1]) <= tol
    batch_size, num_heads, num_rounds, seq_len = near.shape
    return near.reshape(batch_size, num_heads, num_rounds * seq_len)


CASES = [
    # (B, H, L, D, R, num_buckets, mask kind, increase_num_buckets)
    (1, 1, 1, 16, 1, 4, "none", False),
    (2, 3, 37, 32, 2, [4, 6], "pad", False),
    (2, 1, 100, 64, 4, [2, 2, 4], "pad", False),
    (2, 3, 37, 64, 4, 8, "none", True),
    (1, 3, 100, 32, 1, [2, 2, 4], "ones", False),
    (2, 3, 37, 16, 2, 32, "ones", True),
    (2, 1, 100, 64, 2, [4, 6], "pad", True),
    (3, 2, 37, 48, 2, [16, 8], "pad", False),
]


def _case_id(case):
    b, h, length, d, r, nb, mask, inc = case
    nb_id = "x".join(map(str, nb)) if isinstance(nb, list) else str(nb)
    return f"B{b}-H{h}-L{length}-D{d}-R{r}-NB{nb_id}-{mask}{'-inc' if inc else ''}"


# (dtype, max fraction of near-tie positions excluded): the fraction is a property of the data,
# bounded so that a test cannot pass by excluding a large share of the entries
DTYPES = [
    pytest.param(torch.float32, 0.001, id="fp32"),
    pytest.param(torch.float16, 0.02, id="fp16"),
    pytest.param(torch.bfloat16, 0.1, id="bf16"),
]


@pytest.mark.parametrize("dtype, max_excluded", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hash_matches_reference(case, dtype, max_excluded, device):
    batch_size, num_heads, seq_len, head_dim, num_rounds, num_buckets, mask_kind, increase = case
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device).to(dtype)
    rotations = _rotations(num_heads, head_dim, num_rounds, num_buckets, device)
    mask = _mask(batch_size, seq_len, device, mask_kind)

    expected = lsh_hash_reference(vectors, rotations, num_buckets, mask, increase)
    with reformer_kernels.backend("triton"):
        actual = lsh_hash(vectors, rotations, num_buckets, mask, increase)

    assert actual.dtype == torch.int32 and actual.shape == expected.shape
    near = _near_ties(vectors.cpu(), rotations.cpu(), num_buckets).to(actual.device)
    if mask is not None and (mask == 0).any():
        # padded tokens get the pad bucket whatever their projection: never excluded
        padded = (mask == 0)[:, None, None, :].expand(batch_size, num_heads, num_rounds, seq_len)
        near &= ~padded.reshape(batch_size, num_heads, num_rounds * seq_len)
    assert near.float().mean().item() <= max_excluded, f"{near.sum().item()} of {near.numel()} near ties"
    mismatch = (actual != expected) & ~near
    assert not mismatch.any(), f"{mismatch.sum().item()} mismatches, first at {mismatch.nonzero()[0].tolist()}"
    # the pad bucket and the per-round offsets are exact everywhere
    total = 1
    for factor in bucket_factors(num_buckets):
        total *= factor
    has_pad = mask is not None and bool((mask == 0).any())
    per_round = total + int(has_pad or increase)
    rounds = torch.arange(num_rounds, device=actual.device).repeat_interleave(seq_len)
    assert torch.equal(actual.long() // per_round, rounds.expand_as(actual))
    assert (actual.long() % per_round < total + int(has_pad)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_exact_ties_take_the_first_maximum(dtype, device):
    """Zero vectors tie every column and +0 with -0; duplicated columns tie two entries."""
    batch_size, num_heads, seq_len, head_dim, num_rounds = 2, 2, 21, 32, 2
    num_buckets = [8, 6]
    vectors = torch.randn(batch_size, num_heads, seq_len, head_dim, device=device)
    vectors[:, :, ::3] = 0.0
    rotations = _rotations(num_heads, head_dim, num_rounds, num_buckets, device)
    # column 1 duplicates column 0 and column 3 is column 2 negated (group 0 has 4 columns);
    # in group 1 (columns 4..6) column 6 duplicates column 5
    rotations[..., 1] = rotations[..., 0]
    rotations[..., 3] = -rotations[..., 2]
    rotations[..., 6] = rotations[..., 5]
    vectors = vectors.to(dtype)

    expected = lsh_hash_reference(vectors, rotations, num_buckets)
    with reformer_kernels.backend("triton"):
        actual = lsh_hash(vectors, rotations, num_buckets)
    assert torch.equal(actual, expected)
    # zero vectors: argmax of all-zero [xR, -xR] is 0 in every factor -> bucket 0 (+ round offset)
    zero_ids = actual.view(batch_size, num_heads, num_rounds, seq_len)[:, :, :, ::3]
    assert torch.equal(
        zero_ids, (torch.arange(num_rounds, device=actual.device) * 48).view(1, 1, -1, 1).expand_as(zero_ids)
    )
    # duplicated columns: index 1 (the second copy) never wins in group 0, and neither does 4 + 1
    group0 = actual.long() % 48 % 8
    assert not ((group0 == 1) | (group0 == 5)).any()


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)], ids=["fp16", "bf16"])
def test_projection_rounded_like_the_reference(dtype, ulp, device):
    """The reference's projection is in the input dtype: values one below the rounding boundary
    tie with the next one, and the first column wins. Without rounding (or with truncation
    instead of round-to-nearest-even) the kernel would pick column 1."""
    head_dim = 16
    vectors = torch.zeros(1, 1, 1, head_dim, device=device)
    vectors[..., :3] = torch.tensor([1.0, ulp, ulp / 8])
    rotations = torch.zeros(1, head_dim, 1, 4, device=device)
    # column 0: 1 + ulp - ulp/8 (rounds up to 1 + ulp); column 1: exactly 1 + ulp
    rotations[0, :3, 0, 0] = torch.tensor([1.0, 1.0, -1.0])
    rotations[0, :3, 0, 1] = torch.tensor([1.0, 1.0, 0.0])
    vectors = vectors.to(dtype)
    expected = lsh_hash_reference(vectors, rotations, 8)
    with reformer_kernels.backend("triton"):
        actual = lsh_hash(vectors, rotations, 8)
    assert expected.item() == 0
    assert actual.item() == 0


def test_non_contiguous_vectors(device):
    vectors = torch.randn(2, 37, 3, 32, device=device).transpose(1, 2)  # [B, H, L, D] view
    rotations = _rotations(3, 32, 2, [4, 6], device)
    mask = _mask(2, 37, device, "pad")
    expected = lsh_hash_reference(vectors, rotations, [4, 6], mask)
    with reformer_kernels.backend("triton"):
        actual = lsh_hash(vectors, rotations, [4, 6], mask)
    near = _near_ties(vectors.cpu(), rotations.cpu(), [4, 6])
    assert not ((actual != expected) & ~near).any()


def test_boolean_and_float_masks(device):
    vectors = torch.randn(2, 2, 30, 16, device=device)
    rotations = _rotations(2, 16, 2, 8, device)
    mask = _mask(2, 30, device, "pad")
    with reformer_kernels.backend("triton"):
        ids_long = lsh_hash(vectors, rotations, 8, mask)
        ids_bool = lsh_hash(vectors, rotations, 8, mask.bool())
        ids_float = lsh_hash(vectors, rotations, 8, mask.float())
    assert torch.equal(ids_long, ids_bool) and torch.equal(ids_long, ids_float)
    expected = lsh_hash_reference(vectors, rotations, 8, mask)
    near = _near_ties(vectors, rotations, 8) & ~(mask == 0)[:, None, None, :].expand(2, 2, 2, 30).reshape(2, 2, 60)
    assert not ((ids_long != expected) & ~near).any()


def test_empty_length(device):
    vectors = torch.randn(2, 3, 0, 16, device=device)
    rotations = _rotations(3, 16, 2, 8, device)
    with reformer_kernels.backend("triton"):
        ids = lsh_hash(vectors, rotations, 8)
    assert ids.shape == (2, 3, 0) and ids.dtype == torch.int32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # a kernel limit, not bad input: the README promises a ValueError on backend triton
        (dict(dtype=torch.float64), ValueError, "float16, bfloat16 or float32 vectors; got torch.float64"),
        (dict(head_dim=300), ValueError, "head_dim"),
        (dict(num_buckets=[2, 2, 2, 2, 2]), ValueError, "at most 4 factors"),
        (dict(num_buckets=512), ValueError, "factors must be <="),
        (dict(num_buckets=[256, 256, 256, 256]), ValueError, r"num_hashes \* \(prod\(num_buckets\) \+ 1\)"),
        (dict(rotation_rounds_mismatch=True), ValueError, "rotations must have shape"),
        (dict(mask_shape=(2, 5)), ValueError, "attention_mask must have shape"),
        (dict(rotations_dtype=torch.int32), TypeError, "rotations must be a floating-point tensor"),
    ],
    ids=["fp64", "head_dim", "factors", "factor_size", "int32_overflow", "rotations", "mask", "rot_dtype"],
)
def test_validation_errors(kwargs, error, match, device):
    head_dim = kwargs.get("head_dim", 16)
    num_buckets = kwargs.get("num_buckets", 8)
    vectors = torch.randn(2, 2, 10, head_dim, device=device, dtype=kwargs.get("dtype", torch.float32))
    width = sum(bucket_factors(num_buckets)) // 2
    rotations = torch.randn(2, head_dim, 2, width + int(kwargs.get("rotation_rounds_mismatch", False)), device=device)
    rotations = rotations.to(kwargs.get("rotations_dtype", torch.float32))
    mask = torch.ones(kwargs["mask_shape"], device=device) if "mask_shape" in kwargs else None
    with pytest.raises(error, match=match):
        lsh_hash_triton(vectors, rotations, num_buckets, mask)


def test_is_supported():
    x = torch.zeros(1, 1, 1, 64)
    assert is_supported(x, 64) and is_supported(x.half(), [64, 128]) and is_supported(x.bfloat16(), [2, 2, 2, 2])
    assert not is_supported(x.double(), 64)
    assert not is_supported(torch.zeros(1, 1, 1, 300), 64)
    assert not is_supported(x, 512)
    assert not is_supported(x, [2, 2, 2, 2, 2])


def _nan_inputs(dtype, device):
    """Vectors and rotations with NaN and inf placed to exercise every branch of argmax's NaN rule."""
    gen = torch.Generator().manual_seed(11)
    vectors = torch.randn(2, 2, 12, 16, generator=gen)
    vectors[0, 0, 1] = float("nan")  # a whole NaN vector
    vectors[0, 1, 2, 3] = float("nan")  # one NaN coordinate: every projection NaN
    vectors[1, 0, 4, 5] = float("inf")  # projections +-inf: ties among +inf, the first wins
    vectors[1, 1, 6, 0] = -float("inf")
    rotations = torch.randn(2, 16, 2, 6, generator=gen)  # num_buckets [4, 8]: columns 0-1 and 2-5
    rotations[1, :, 1, 3] = float("nan")  # one NaN column of factor 8 in round 1 of head 1
    return vectors.to(dtype).to(device), rotations.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_nan_and_inf_hash_like_argmax_on_every_backend(dtype, device):
    """One NaN rule for every backend (reference.py's docstring): a projection row with NaN takes its
    first NaN column, as ``torch.argmax`` does; the Triton kernel returned ids outside [0, num_bins)."""
    vectors, rotations = _nan_inputs(dtype, device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, -2:] = 0
    expected = lsh_hash_reference(vectors, rotations, [4, 8], mask)
    for name in ("torch", "triton"):
        with reformer_kernels.backend(name):
            ids = lsh_hash(vectors, rotations, [4, 8], mask)
        assert torch.equal(ids, expected), name
    # the NaN vector: bucket 0 of both factors in both rounds (round 1 adds the offset 32 + 1)
    assert expected[0, 0, 1].item() == 0 and expected[0, 0, 12 + 1].item() == 33
    # the NaN rotation column (column 1 of factor 8): every vector of head 1, round 1, gets digit 1,
    # except the vector with a NaN coordinate (batch 0, position 2), whose first NaN column is 0
    digits = (expected[:, 1, 12:-2] - 33) // 4  # mixed radix: factor 4 first (least significant)
    assert digits[0, 2] == 0 and digits[0, :2].eq(1).all() and digits[0, 3:].eq(1).all() and digits[1].eq(1).all()
    assert ((expected >= 0) & (expected < 2 * 33)).all()


def test_bucket_ids_are_int64_past_int32(device):
    """rounds * (prod(num_buckets) + 1) >= 2**31: ids no longer fit int32. The PyTorch path returns
    int64 ids (they went negative, silently changing the sort order); the Triton kernel, which writes
    int32, refuses with a ValueError naming num_buckets and num_hashes (auto runs PyTorch)."""
    gen = torch.Generator().manual_seed(2)
    num_buckets = [2**16, 2**16]
    vectors = torch.randn(1, 1, 5, 4, generator=gen).to(device)
    rotations = torch.randn(1, 4, 2, 2**16, generator=gen).to(device)
    with reformer_kernels.backend("torch"):
        ids = lsh_hash(vectors, rotations, num_buckets)
    assert ids.dtype == torch.int64
    # independently: per factor the argmax of [xR, -xR], mixed radix, round offset 2**32 (no padding)
    rotated = torch.einsum("bhld,hdrk->bhrlk", vectors, rotations)  # [1, 1, 2, 5, 2**16]
    digits = [torch.argmax(torch.cat([x, -x], -1), -1) for x in rotated.split(2**15, dim=-1)]
    offsets = torch.arange(2, device=device).view(1, 1, 2, 1) * 2**32
    expected = (digits[0] + 2**16 * digits[1] + offsets).view(1, 1, 10)
    assert torch.equal(ids, expected)
    assert (ids[..., 5:] >= 2**32).all()
    # bucket_sort takes them (the PyTorch sort: the counting sort's tables cannot hold 2**33 bins)
    with reformer_kernels.backend("torch"):
        sorted_idx, _ = bucket_sort(ids, 2 * (2**32 + 1))
    assert torch.equal(sorted_idx, torch.sort(expected, stable=True).indices)
    # the kernel's limit, with factors it takes otherwise
    wide = torch.randn(1, 4, 1, 4 * 128, generator=gen).to(device)
    with reformer_kernels.backend("triton"), pytest.raises(ValueError, match=r"num_buckets .* num_hashes"):
        lsh_hash(vectors, wide, [256, 256, 256, 256])
    assert not is_supported(vectors, [256, 256, 256, 256]) and is_supported(vectors, [256, 256, 256, 64])
