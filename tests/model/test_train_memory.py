"""Training-time dropout inside the blocked CPU paths: the feed-forward's forward and reversible backward, and the
attention output projection, draw their masks as bool tensors (``fast_path.dropout_keep_mask``) and apply them
row block by row block. They must draw what ``F.dropout`` draws (same masks, same RNG consumption, per
``chunk_size_feed_forward`` chunk) and compute what the modules called compute: transformers' modules under the
same seed, and our own model with the fast paths switched off by forward hooks.

The blocked paths engage from ``ONEDNN_MIN_ROWS`` (1,024) rows; the shapes here have 3,072 rows, i.e. one full
``CPU_BLOCK_ROWS`` (2,048) block and a partial one, so the masks are sliced across blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testing import hf_model, load_ours, max_abs, rel_err, tiny_config

import reformer
from reformer.modules import fast_path, projections
from reformer.modules.feed_forward import ChunkReformerFeedForward

CPU = torch.device("cpu")
BATCH, SEQ_LEN = 2, 1536  # 3,072 rows: blocks of 2,048 and 1,024 rows


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# the masks: bool draws are F.dropout's fp32 draws
# --------------------------------------------------------------------------------------------------
# 7 and 3,000 elements: below and above bernoulli_'s parallel grain (800 elements)
@pytest.mark.parametrize("shape", [(7,), (2, 1500), (3, 64, 40)])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_bool_keep_mask_is_the_fp32_bernoulli_draw(shape, p):
    torch.manual_seed(3)
    fp32 = torch.empty(shape).bernoulli_(1.0 - p)
    state_after_fp32 = torch.get_rng_state()
    torch.manual_seed(3)
    keep = fast_path.dropout_keep_mask(shape, p, True, CPU)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, fp32 == 1)
    assert torch.equal(torch.get_rng_state(), state_after_fp32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_keep_mask_and_noise_are_f_dropout_bit_for_bit(p, training):
    """Forward ``x * noise`` and backward ``grad * noise`` equal F.dropout's, and the generator ends where
    F.dropout leaves it (p = 1 and p = 0 draw nothing)."""
    x = _randn(5, 300, seed=1).requires_grad_()
    grad = _randn(5, 300, seed=2)
    torch.manual_seed(8)
    want = F.dropout(x, p, training)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    state_after = torch.get_rng_state()
    torch.manual_seed(8)
    keep = fast_path.dropout_keep_mask(tuple(x.shape), p, training, CPU)
    assert torch.equal(torch.get_rng_state(), state_after)
    noise = fast_path.dropout_noise(keep, p, x.dtype)
    assert (noise is None) == (not training or p == 0)
    got = x.detach() if noise is None else x.detach() * noise
    got_grad = grad if noise is None else grad * noise
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    if training and p == 0.2:
        assert (want == 0).any() and (want != 0).any()


# --------------------------------------------------------------------------------------------------
# module level: the blocked paths against transformers' modules under the same seed
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 512], ids=["unchunked", "chunk-512"])
def test_blocked_feed_forward_with_dropout_equals_transformers(chunk, tmp_path, monkeypatch):
    """``Y2 = X2 + g(Y1)`` by the blocked forward, and ``X2, dY1 + (dg/dY1)^T dY2`` and the parameter gradients by
    ``reverse_blocked`` replayed from the same seed, against transformers' ``ChunkReformerFeedForward`` and
    autograd. With ``chunk_size_feed_forward = 512`` the plain forward draws per chunk of 2 x 512 rows, chunks that
    end inside a row block: the blocked path must draw in that order."""
    config = tiny_config(
        attn_layers=["local"], hidden_act="relu", hidden_dropout_prob=0.2, chunk_size_feed_forward=chunk
    )
    hf = hf_model("ReformerModel", **config).train()
    ours = load_ours(hf, tmp_path).train()
    theirs_ff, ours_ff = hf.encoder.layers[0].feed_forward, ours.encoder.layers[0].feed_forward
    hidden = config["hidden_size"]
    y1, y2, grad_y1, grad_y2 = (_randn(BATCH, SEQ_LEN, hidden, seed=s) for s in range(10, 14))

    # transformers: g(Y1) and its gradients by autograd
    torch.manual_seed(5)
    y1_leaf = y1.clone().requires_grad_()
    g = theirs_ff(y1_leaf)
    state_after_theirs = torch.get_rng_state()
    names = [name for name, _ in theirs_ff.named_parameters()]
    grads = torch.autograd.grad(g, [y1_leaf, *theirs_ff.parameters()], grad_y2)
    want_grad_y1 = grad_y1 + grads[0]
    want_params = dict(zip(names, grads[1:]))
    assert (g == 0).any(), "dropout is not active"

    blocked_calls = []
    original = ChunkReformerFeedForward._forward_blocked

    def counted(self, *args, **kwargs):
        blocked_calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChunkReformerFeedForward, "_forward_blocked", counted)

    # ours, forward: Y2 = X2 + g(Y1) written into the residual
    x2 = y2 - g.detach()
    torch.manual_seed(5)
    with torch.no_grad():
        got_y2 = ours_ff(y1, residual=x2.clone(), in_place=True)
    assert blocked_calls == [1]
    assert torch.equal(torch.get_rng_state(), state_after_theirs)
    # fp32 summation order of the products (oneDNN in blocks vs MKL over the sequence) is the only difference
    assert max_abs(got_y2, y2) <= 1e-5

    # ours, reversible backward replayed from the same seed
    torch.manual_seed(5)
    assert ours_ff.reverse_fusable(y1, y2, grad_y1, grad_y2)
    got_x2, got_grad_y1, got_grads = ours_ff.reverse_blocked(y1, y2, grad_y1, grad_y2)
    assert max_abs(got_x2, x2) <= 1e-5
    # as test_reversible.py::test_blocked_reversible_backward_equals_autograd: fp32 sums over 3,072 rows in
    # another order (per block, then over blocks)
    assert rel_err(got_grad_y1, want_grad_y1) <= 1e-5
    ours_params = dict(ours_ff.named_parameters())
    for name in names:
        assert rel_err(got_grads[ours_params[name]], want_params[name]) <= 1e-5, name


def test_blocked_output_projection_with_dropout_equals_transformers(tmp_path):
    """The attention output projection added into the residual in blocks, with its dropout, against
    transformers' ``ReformerSelfOutput`` under the same seed."""
    config = tiny_config(attn_layers=["local"], hidden_dropout_prob=0.2)
    hf = hf_model("ReformerModel", **config).train()
    ours = load_ours(hf, tmp_path).train()
    theirs_out, ours_out = hf.encoder.layers[0].attention.output, ours.encoder.layers[0].attention.output
    width = config["num_attention_heads"] * config["attention_head_size"]
    context = _randn(BATCH, SEQ_LEN, width, seed=20)
    residual = _randn(BATCH, SEQ_LEN, config["hidden_size"], seed=21)
    torch.manual_seed(6)
    with torch.no_grad():
        want = residual + theirs_out(context)
    state_after_theirs = torch.get_rng_state()
    assert (want == residual).any(), "dropout is not active"
    calls = []
    original = projections.dropout_keep_mask

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.manual_seed(6)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(projections, "dropout_keep_mask", counted)
        got = ours_out(context, residual=residual.clone(), in_place=True)
    assert calls == [1], "the blocked path did not run"
    assert torch.equal(torch.get_rng_state(), state_after_theirs)
    assert max_abs(got, want) <= 1e-5


# --------------------------------------------------------------------------------------------------
# model level: a reversible training step with and without the fast paths
# --------------------------------------------------------------------------------------------------
def _training_step(model, ids, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


# 2 x 1,088 = 2,176 rows: blocks of 2,048 and 128 rows
MODEL_SEQ_LEN = 1088


# 700: chunks of 700 and 388 positions (a last shorter chunk, which only our plain path allows)
@pytest.mark.parametrize("chunk", [0, 700], ids=["unchunked", "chunk-700"])
def test_training_step_with_dropout_equals_the_plain_modules(chunk, monkeypatch):
    """Loss and every gradient of a reversible training step with dropout everywhere equal those of the same
    model whose feed-forward and attention output modules carry a no-op forward hook (``plain_modules`` false:
    the modules are called, F.dropout draws). Without the RNG replay around ``reverse_blocked`` its masks would
    come from wherever the global RNG stands in the backward."""
    config = reformer.ReformerConfig(
        **tiny_config(
            is_decoder=True,
            attn_layers=["local", "lsh"],
            num_hashes=1,
            hash_seed=3,
            axial_pos_shape=[32, 34],
            max_position_embeddings=MODEL_SEQ_LEN,
            chunk_size_feed_forward=chunk,
            hidden_dropout_prob=0.2,
            local_attention_probs_dropout_prob=0.3,
            lsh_attention_probs_dropout_prob=0.25,
        )
    )
    torch.manual_seed(0)
    model = reformer.ReformerModelWithLMHead(config).train()
    ids = torch.randint(3, 37, (BATCH, MODEL_SEQ_LEN), generator=torch.Generator().manual_seed(4))

    calls = {"forward": 0, "reverse": 0}
    cls = ChunkReformerFeedForward
    original_forward, original_reverse = cls._forward_blocked, cls.reverse_blocked

    def counted_forward(self, *args, **kwargs):
        calls["forward"] += 1
        return original_forward(self, *args, **kwargs)

    def counted_reverse(self, *args, **kwargs):
        calls["reverse"] += 1
        return original_reverse(self, *args, **kwargs)

    monkeypatch.setattr(cls, "_forward_blocked", counted_forward)
    monkeypatch.setattr(cls, "reverse_blocked", counted_reverse)

    loss_blocked, blocked = _training_step(model, ids, seed=123)
    assert calls == {"forward": 2, "reverse": 2}

    layers = model.reformer.encoder.layers
    hooked = [m for layer in layers for m in (*layer.feed_forward.modules(), layer.attention.output.dense)]
    handles = [m.register_forward_hook(lambda *args: None) for m in hooked]
    try:
        loss_plain, plain = _training_step(model, ids, seed=123)
        assert calls == {"forward": 2, "reverse": 2}, "the hooks did not switch the blocked paths off"
    finally:
        for handle in handles:
            handle.remove()

    torch.testing.assert_close(loss_blocked, loss_plain, rtol=1e-6, atol=0)
    errors = {name: rel_err(blocked[name], plain[name]) for name in plain}
    assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda item: item[1])
    # dropout is active: another seed moves the gradients far beyond that
    _, other = _training_step(model, ids, seed=124)
    assert max(rel_err(other[name], plain[name]) for name in plain) > 1e-2
