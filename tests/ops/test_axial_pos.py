"""Triton axial position embedding (fused with the word embedding) vs the PyTorch reference.

Forward and gradients of every factor table and of the word embedding, for 1- to 5-axis shapes
(5 axes exercise the split into several launches of at most MAX_AXES tables), training layout
(regular backward), offset / random / short position ids (sorted backward), split backward rows,
dropout (transformers' dropout2d pattern, Philox word dropout), determinism and bad input.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import warnings

import pytest
import torch

import reformer_kernels
from reformer_kernels.ops.axial_pos import (
    axial_dropout_mask,
    axial_position_embedding,
    axial_position_embedding_reference,
    axial_position_row,
    axial_word_embedding,
    axial_word_embedding_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BF16_INTERP = pytest.mark.skipif(
    INTERPRET, reason="Triton 3.9 interpreter: bf16 arithmetic and fp32->bf16 casts are silently wrong"
)

# (id, axial_pos_shape, axial_pos_embds_dim)
CASES = [
    ("A1-n10-d13", (10,), (13,)),
    ("A2-n4x6-d5x11", (4, 6), (5, 11)),
    ("A3-n3x4x5-d5x11x16", (3, 4, 5), (5, 11, 16)),
    ("A4-n2x3x2x3-d3x5x7x9", (2, 3, 2, 3), (3, 5, 7, 9)),
    ("A5-n2x2x3x2x2-d3x4x5x6x7", (2, 2, 3, 2, 2), (3, 4, 5, 6, 7)),
]
POS_MODES = ["train", "arange+7", "random", "short"]
VOCAB = 37

# (dtype, atol, rtol): kernel error vs the fp64 truth <= 2 * (torch-in-dtype error) + atol + rtol * max|truth|
PRECISIONS = [
    pytest.param(torch.float32, 1e-5, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-4, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-3, id="bf16", marks=BF16_INTERP),
]


def _tables(shape, dims, dtype, device, vocab=VOCAB):
    axial = [torch.randn(n, d, device=device).to(dtype) for n, d in zip(shape, dims)]
    word = torch.randn(vocab, sum(dims), device=device).to(dtype)
    return word, axial


def _positions(mode, shape, batch, device, ids_dtype=torch.int64):
    """(position_ids or None, length) for a position mode."""
    total = math.prod(shape)
    if mode == "train":
        return None, total
    if mode == "short":
        return None, total // 2 + 1
    if mode == "arange+7":
        length = max(total - 7, 1)
        start = total - length
        pos = (torch.arange(length, device=device) + start).to(ids_dtype)
        # stride-0 batch dimension, as a model builds it with expand
        return pos.unsqueeze(0).expand(batch, length), length
    length = total + 3
    return torch.randint(0, total, (batch, length), device=device).to(ids_dtype), length


def _check(name, got, truth, low, atol, rtol):
    err = (got.double() - truth).abs().max().item()
    err_low = (low.double() - truth).abs().max().item()
    bound = 2 * err_low + atol + rtol * truth.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (torch-in-dtype error {err_low:.3g})"


def _run(fn, word, axial, grad_out, with_word):
    """Output and gradients ``(out, d_word or None, [d_axial])`` of ``fn(word, axial)``."""
    word = word.detach().requires_grad_(with_word)
    axial = [w.detach().requires_grad_() for w in axial]
    out = fn(word if with_word else None, axial)
    inputs = ([word] if with_word else []) + axial
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), (grads[0] if with_word else None), list(grads[1:] if with_word else grads)


def _compare_to_reference(ids, pos, word, axial, dtype, atol, rtol, with_word, **triton_kwargs):
    from reformer_kernels.ops.axial_pos.triton import _axial_word_embedding

    batch, length = ids.shape
    hidden = word.shape[1]
    axial_mask = triton_kwargs.get("axial_mask")
    word_mask = triton_kwargs.pop("word_mask", None)
    grad_out = torch.randn(batch, length, hidden, device=word.device).to(dtype)
    ids_in = ids if with_word else None
    if not with_word and pos is None:
        pos = torch.arange(length, device=word.device).expand(batch, length)

    def ref(mask_dtype):
        def fn(w, a):
            m = None if axial_mask is None else axial_mask.to(mask_dtype)
            wm = None if word_mask is None else word_mask.to(mask_dtype)
            return axial_word_embedding_reference(ids_in, w, a, pos, axial_mask=m, word_mask=wm)

        return fn

    got = _run(lambda w, a: _axial_word_embedding(ids_in, w, a, pos, **triton_kwargs), word, axial, grad_out, with_word)
    truth = _run(ref(torch.float64), word.double(), [w.double() for w in axial], grad_out.double(), with_word)
    low = _run(ref(dtype), word, axial, grad_out, with_word)
    assert got[0].dtype == dtype and got[0].shape == (batch, length, hidden)
    _check("forward", got[0], truth[0], low[0], atol, rtol)
    if with_word:
        assert got[1].dtype == dtype
        _check("d_word", got[1], truth[1], low[1], atol, rtol)
    for a, (g, t, lo) in enumerate(zip(got[2], truth[2], low[2])):
        assert g.dtype == dtype
        _check(f"d_axial[{a}]", g, t, lo, atol, rtol)
    return got


@pytest.mark.parametrize("with_word", [True, False], ids=["fused", "pos-only"])
@pytest.mark.parametrize("mode", POS_MODES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_fp32(device, case, mode, with_word):
    _, shape, dims = case
    batch = 3 if mode == "random" else 2
    word, axial = _tables(shape, dims, torch.float32, device)
    pos, length = _positions(mode, shape, batch, device)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    _compare_to_reference(ids, pos, word, axial, torch.float32, 1e-5, 1e-6, with_word)


@pytest.mark.parametrize("dtype, atol, rtol", PRECISIONS)
@pytest.mark.parametrize("mode", ["train", "random"])
@pytest.mark.parametrize("case", CASES[1:3], ids=[c[0] for c in CASES[1:3]])
def test_matches_reference_low_precision(device, case, mode, dtype, atol, rtol):
    _, shape, dims = case
    word, axial = _tables(shape, dims, dtype, device)
    pos, length = _positions(mode, shape, 2, device, ids_dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (2, length), device=device, dtype=torch.int32)
    _compare_to_reference(ids, pos, word, axial, dtype, atol, rtol, True)


def _word_keep(seed, p, batch, length, shape, dims, device):
    """The kernel's word-dropout multipliers for ``seed`` (word table of ones, zero axial tables)."""
    from reformer_kernels.ops.axial_pos.triton import _axial_word_embedding

    hidden = sum(dims)
    ones = torch.ones(1, hidden, device=device)
    zeros = [torch.zeros(n, d, device=device) for n, d in zip(shape, dims)]
    ids = torch.zeros(batch, length, dtype=torch.int64, device=device)
    return _axial_word_embedding(ids, ones, zeros, torch.zeros_like(ids), word_seed=seed, word_dropout_p=p)


@pytest.mark.parametrize("mode", ["train", "random"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_dropout_matches_reference(device, case, mode):
    _, shape, dims = case
    p, batch = 0.3, 2
    word, axial = _tables(shape, dims, torch.float32, device)
    pos, length = _positions(mode, shape, batch, device)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    mask = axial_dropout_mask(batch, shape, sum(dims), p, device=device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep = _word_keep(seed, p, batch, length, shape, dims, device)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert bool(((keep == 0) | (keep == scale)).all())
    dropped = (keep == 0).double().mean().item()
    assert abs(dropped - p) < 0.06, f"word dropout drops {dropped:.3f}, expected {p}"
    assert not torch.equal(keep, _word_keep(seed + 1, p, batch, length, shape, dims, device))
    _compare_to_reference(
        ids,
        pos,
        word,
        axial,
        torch.float32,
        1e-5,
        1e-6,
        True,
        axial_mask=mask,
        word_seed=seed,
        word_dropout_p=p,
        word_mask=keep,
    )


def _force_splits(monkeypatch):
    from reformer_kernels.ops.axial_pos import triton as axial_triton

    monkeypatch.setattr(axial_triton, "_SPLIT_MIN_TOKENS", 4)
    monkeypatch.setattr(axial_triton, "_SPLIT_TARGET_PROGRAMS", 10**6)
    return axial_triton


@pytest.mark.parametrize("mode", ["train", "random"])
def test_split_rows_match_reference(device, monkeypatch, mode):
    axial_triton = _force_splits(monkeypatch)
    shape, dims = (4, 6), (5, 11)
    assert axial_triton._num_splits(3 * 24 / 4, 4) > 1
    word, axial = _tables(shape, dims, torch.float32, device)
    pos, length = _positions(mode, shape, 3, device)
    ids = torch.randint(0, VOCAB, (3, length), device=device)
    mask = axial_dropout_mask(3, shape, sum(dims), 0.5, device=device)
    _compare_to_reference(ids, pos, word, axial, torch.float32, 1e-5, 1e-6, True, axial_mask=mask)


@pytest.mark.parametrize("mode", ["train", "random"])
def test_backward_is_deterministic(device, monkeypatch, mode):
    from reformer_kernels.ops.axial_pos.triton import _axial_word_embedding

    _force_splits(monkeypatch)
    shape, dims = (3, 4, 5), (5, 11, 16)
    word, axial = _tables(shape, dims, torch.float32, device)
    pos, length = _positions(mode, shape, 3, device)
    ids = torch.randint(0, 5, (3, length), device=device)  # few ids: long word-gradient segments
    mask = axial_dropout_mask(3, shape, sum(dims), 0.25, device=device)
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    grad_out = torch.randn(3, length, sum(dims), device=device)

    def grads():
        fn = lambda w, a: _axial_word_embedding(ids, w, a, pos, axial_mask=mask, word_seed=seed, word_dropout_p=0.25)
        _, d_word, d_axial = _run(fn, word, axial, grad_out, True)
        return [d_word, *d_axial]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        assert a.abs().sum() > 0


def _hf_config(shape, dims, p):
    transformers = pytest.importorskip("transformers")
    return transformers.ReformerConfig(
        axial_pos_shape=shape,
        axial_pos_embds_dim=dims,
        hidden_size=sum(dims),
        hidden_dropout_prob=p,
        vocab_size=VOCAB,
        attn_layers=["local"],
        local_attn_chunk_length=2,
        max_position_embeddings=math.prod(shape),
    )


def _hf_embeddings(shape, dims, p, device):
    from transformers.models.reformer.modeling_reformer import ReformerEmbeddings

    emb = ReformerEmbeddings(_hf_config(shape, dims, p)).to(device)
    with torch.no_grad():
        for w in emb.position_embeddings.weights:
            w.normal_()
    axial = [w.reshape(n, d) for w, n, d in zip(emb.position_embeddings.weights, shape, dims)]
    return emb, emb.word_embeddings.weight, axial


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eval_matches_transformers(device, backend):
    shape, dims = (4, 6), (5, 11)
    emb, word, axial = _hf_embeddings(shape, dims, 0.2, device)
    emb.eval()
    ids = torch.randint(0, VOCAB, (2, 15), device=device)
    start = 5
    with torch.no_grad():
        expected = emb(input_ids=ids, start_idx_pos_encodings=start)
        pos = (torch.arange(15, device=device) + start).expand(2, 15)
        with reformer_kernels.backend(backend):
            got = axial_word_embedding(ids, word, axial, pos)
            got_pos = axial_position_embedding(pos, axial)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_pos, emb.position_embeddings(pos), atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape, dims", [((7,), (9,)), ((4, 6), (5, 11)), ((2, 3, 4), (5, 11, 16))], ids=["A1", "A2", "A3"]
)
def test_one_host_position_is_the_reference_row(shape, dims):
    """``axial_position_row`` (a CPU decoding step's position, a host integer): bit for bit the reference's
    embedding of that position, for every position of the grid; and transformers' step embedding with it."""
    generator = torch.Generator().manual_seed(len(shape))
    tables = [torch.randn(n, d, generator=generator) for n, d in zip(shape, dims)]
    for position in range(math.prod(shape)):
        expected = axial_position_embedding_reference(torch.tensor([[position]]), tables)[0, 0]
        assert torch.equal(axial_position_row(tables, position), expected), position
    if len(shape) == 2:
        emb, word, axial = _hf_embeddings(shape, dims, 0.0, "cpu")
        emb.eval()
        ids = torch.randint(0, VOCAB, (3, 1), generator=generator)
        with torch.no_grad():
            for start in (0, 5, math.prod(shape) - 1):
                expected = emb(input_ids=ids, start_idx_pos_encodings=start)
                assert torch.equal(word[ids] + axial_position_row(axial, start), expected), start


@pytest.mark.parametrize("shape, dims", [((4, 6), (5, 11)), ((2, 3, 4), (5, 11, 16))], ids=["A2", "A3"])
def test_training_dropout_torch_path_is_transformers(device, shape, dims):
    """The torch backend reproduces ReformerEmbeddings in training bit for bit under the same seed."""
    emb, word, axial = _hf_embeddings(shape, dims, 0.4, device)
    emb.train()
    ids = torch.randint(0, VOCAB, (3, math.prod(shape)), device=device)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' dropout2d on a non-4-D tensor warns
        expected = emb(input_ids=ids)
    torch.manual_seed(7)
    with reformer_kernels.backend("torch"):
        got = axial_word_embedding(ids, word, axial, None, dropout_p=0.4)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "shape, dims", [((10,), (13,)), ((4, 6), (5, 11)), ((2, 3, 4), (5, 11, 16))], ids=["A1", "A2", "A3"]
)
def test_training_axial_dropout_triton_is_transformers(device, shape, dims):
    """Position-only, the Triton path draws transformers' dropout2d multipliers and applies them identically."""
    from transformers.models.reformer.modeling_reformer import AxialPositionEmbeddings

    ape = AxialPositionEmbeddings(_hf_config(shape, dims, 0.4)).to(device)
    with torch.no_grad():
        for w in ape.weights:
            w.normal_()
    ape.train()
    axial = [w.reshape(n, d) for w, n, d in zip(ape.weights, shape, dims)]
    pos = torch.arange(math.prod(shape), device=device).expand(3, -1)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' dropout2d on a non-4-D tensor warns
        expected = ape(pos)
    torch.manual_seed(11)
    with reformer_kernels.backend("triton"):
        got = axial_word_embedding(None, None, axial, pos, dropout_p=0.4)
    assert (expected == 0).any() and (expected != 0).any()
    assert torch.equal(got, expected)


def test_public_op_dispatch_and_empty(device):
    shape, dims = (4, 6), (5, 11)
    word, axial = _tables(shape, dims, torch.float32, device)
    pos = torch.randint(0, 24, (2, 9), device=device)
    with reformer_kernels.backend("triton"):
        got = axial_position_embedding(pos, axial)
        empty = axial_word_embedding(
            torch.zeros(0, 5, dtype=torch.int64, device=device),
            word.requires_grad_(),
            [w.requires_grad_() for w in axial],
        )
    torch.testing.assert_close(got, axial_position_embedding_reference(pos, axial), atol=0, rtol=0)
    assert empty.shape == (0, 5, 16)
    empty.sum().backward()
    assert word.grad is not None and not word.grad.any() and not axial[1].grad.any()


def _bad_calls(device):
    word, axial = _tables((4, 6), (5, 11), torch.float32, device)
    ids = torch.randint(0, VOCAB, (2, 8), device=device)
    pos = torch.randint(0, 24, (2, 8), device=device)
    return [
        ("position_ids", lambda: axial_word_embedding(ids, word, axial, pos.clone().fill_(24))),
        ("position_ids", lambda: axial_word_embedding(ids, word, axial, pos - 30)),
        ("position_ids", lambda: axial_position_embedding(pos + 24, axial)),
        ("position_ids", lambda: axial_word_embedding(ids, word, axial, pos.float())),
        ("position_ids", lambda: axial_word_embedding(ids, word, axial, pos[0])),
        ("position_ids shape", lambda: axial_word_embedding(ids, word, axial, pos[:, :5])),
        ("input_ids", lambda: axial_word_embedding(ids + VOCAB, word, axial, pos)),
        ("input_ids", lambda: axial_word_embedding(ids.float(), word, axial, pos)),
        (
            "input_ids length",
            lambda: axial_word_embedding(torch.zeros(2, 25, dtype=torch.int64, device=device), word, axial),
        ),
        ("word_weight", lambda: axial_word_embedding(ids, word[:, :15], axial, pos)),
        ("word_weight", lambda: axial_word_embedding(ids, word.double(), axial, pos)),
        ("input_ids and word_weight", lambda: axial_word_embedding(ids, None, axial, pos)),
        ("position_ids is required", lambda: axial_word_embedding(None, None, axial, None)),
        ("axial_weights[1]", lambda: axial_word_embedding(ids, word, [axial[0], axial[1].half()], pos)),
        ("axial_weights[0]", lambda: axial_word_embedding(ids, word, [axial[0].long(), axial[1]], pos)),
        ("axial_weights", lambda: axial_word_embedding(ids, word, [], pos)),
        ("dropout_p", lambda: axial_word_embedding(ids, word, axial, pos, dropout_p=1.5)),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises(device, backend):
    with reformer_kernels.backend(backend):
        for needle, call in _bad_calls(device):
            with pytest.raises((ValueError, TypeError), match=re.escape(needle)):
                call()


def test_bad_explicit_randomness_raises(device):
    from reformer_kernels.ops.axial_pos.triton import _axial_word_embedding

    word, axial = _tables((4, 6), (5, 11), torch.float32, device)
    ids = torch.randint(0, VOCAB, (2, 24), device=device)
    with pytest.raises(ValueError, match="axial_mask"):
        _axial_word_embedding(ids, word, axial, axial_mask=torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match="word_seed"):
        _axial_word_embedding(
            ids, word, axial, word_seed=torch.ones(2, dtype=torch.int64, device=device), word_dropout_p=0.1
        )


def test_kernel_specs_cover_kernel_arguments():
    from reformer_kernels.ops.axial_pos import triton as axial_triton

    specs = axial_triton.kernel_specs()
    kernels = {spec.kernel.fn.__name__ if hasattr(spec.kernel, "fn") else spec.kernel.__name__ for spec in specs}
    assert kernels == {"axial_pos_fwd_kernel", "axial_pos_bwd_kernel"}
    for spec in specs:
        names = spec.kernel.arg_names
        assert set(spec.signature) | set(spec.constexprs) == set(names), spec.name
        assert not set(spec.signature) & set(spec.constexprs), spec.name
    dtypes = {spec.signature["p_do" if "p_do" in spec.signature else "p_out"] for spec in specs}
    assert dtypes == {"*fp16", "*bf16", "*fp32"}


@pytest.mark.parametrize(
    "shape, dims", [([16], [8]), ([4, 8], [3, 5]), ([2, 3, 4], [2, 3, 4])], ids=["1axis", "2axes", "3axes"]
)
def test_torch_path_whole_grid_is_word_plus_cat(shape, dims):
    """No dropout, position_ids None, L == prod(n): the in-place broadcast path gives exactly word + cat(axial rows),
    forward and gradients, and really runs."""
    fused = importlib.import_module("reformer_kernels.ops.axial_pos.fused")
    generator = torch.Generator().manual_seed(len(shape))
    seq_len, hidden = math.prod(shape), sum(dims)
    word = torch.randn(11, hidden, generator=generator, requires_grad=True)
    tables = [torch.randn(n, d, generator=generator, requires_grad=True) for n, d in zip(shape, dims)]
    ids = torch.randint(0, 11, (2, seq_len), generator=generator)
    positions = torch.arange(seq_len).expand(2, seq_len)
    expected = word[ids] + axial_position_embedding_reference(positions, tables)
    calls = []
    original = fused._word_rows_plus_grid
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "_word_rows_plus_grid", lambda *a: calls.append(1) or original(*a))
        got = fused.axial_word_embedding_torch(ids, word, tables, None, dropout_p=0.0)
    assert calls == [1]
    assert torch.equal(got, expected)
    grad_out = torch.randn(got.shape, generator=generator)
    for g, e in zip(
        torch.autograd.grad(got, [word, *tables], grad_out), torch.autograd.grad(expected, [word, *tables], grad_out)
    ):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="the refusal is for the Triton interpreter only")
def test_bf16_tables_are_refused_under_the_interpreter():
    """Triton 3.9's interpreter casts fp32 -> bf16 wrongly: backend triton refuses bf16 tables there
    with a ValueError instead of returning wrong embeddings; backend torch computes them."""
    word, axial = _tables((4, 6), (5, 11), torch.bfloat16, "cpu")
    pos = torch.randint(0, 24, (2, 8))
    ids = torch.randint(0, VOCAB, (2, 8))
    with reformer_kernels.backend("triton"):
        with pytest.raises(ValueError, match="bfloat16 tables cannot run under the Triton interpreter"):
            axial_position_embedding(pos, axial)
        with pytest.raises(ValueError, match="bfloat16 tables cannot run under the Triton interpreter"):
            axial_word_embedding(ids, word, axial, pos)
    with reformer_kernels.backend("torch"):
        got = axial_word_embedding(ids, word, axial, pos)
    torch.testing.assert_close(got, axial_word_embedding_reference(ids, word, axial, pos), atol=0, rtol=0)
