"""The reversible stack: its backward equals plain autograd through the same layers, with dropout.

``model.reformer.encoder.reversible = False`` runs the same layers with ordinary autograd (every
activation stored); with the same RNG seed both paths draw the same dropout masks in forward, so the
gradients must agree up to the rounding of the activation reconstruction.
"""

from __future__ import annotations

import pytest
import torch
from model_testing import rel_err, tiny_config

import reformer
import reformer.modules
import reformer.reversible
from reformer.modeling_reformer import LSHSelfAttention

DROPOUT = dict(hidden_dropout_prob=0.2, local_attention_probs_dropout_prob=0.3, lsh_attention_probs_dropout_prob=0.25)


def _model(hash_seed=None, attn_layers=("lsh", "local", "lsh"), **overrides):
    config = reformer.ReformerConfig(
        **tiny_config(
            is_decoder=True,
            attn_layers=list(attn_layers),
            num_hashes=2,
            hash_seed=hash_seed,
            chunk_size_feed_forward=8,
            **{**DROPOUT, **overrides},
        )
    )
    torch.manual_seed(0)
    return reformer.ReformerModelWithLMHead(config).train()


def _ids(seed=3, batch=2, seq_len=32):
    return torch.randint(3, 37, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _step(model, reversible: bool, seed: int, batches):
    model.reformer.encoder.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = sum(model(ids, labels=ids).loss for ids in batches)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _max_rel_err(grads, reference):
    return max(rel_err(grads[name], reference[name]) for name in reference)


@pytest.mark.parametrize("hash_seed", [None, 11], ids=["hash_seed-None", "hash_seed-11"])
def test_reversible_backward_equals_autograd_with_dropout(hash_seed):
    model = _model(hash_seed)
    batches = [_ids()]
    loss_plain, plain = _step(model, reversible=False, seed=123, batches=batches)
    loss_rev, rev = _step(model, reversible=True, seed=123, batches=batches)
    assert torch.equal(loss_plain, loss_rev)
    assert _max_rel_err(rev, plain) <= 1e-5
    # dropout really is active: another seed gives other gradients
    _, other = _step(model, reversible=True, seed=124, batches=batches)
    assert _max_rel_err(other, plain) > 1e-2


def test_replay_without_post_hash_rng_state_is_wrong(monkeypatch):
    """Negative control: replaying attention dropout from the RNG state *before* the rotations were drawn
    (transformers' behaviour with hash_seed=None) gives wrong gradients, and the comparison above sees it."""
    model = _model(hash_seed=None)
    batches = [_ids()]
    _, plain = _step(model, reversible=False, seed=5, batches=batches)
    original = LSHSelfAttention.forward

    def forward_without_rerecord(self, *args, on_hashed=None, **kwargs):
        return original(self, *args, on_hashed=None, **kwargs)

    monkeypatch.setattr(LSHSelfAttention, "forward", forward_without_rerecord)
    _, rev = _step(model, reversible=True, seed=5, batches=batches)
    assert _max_rel_err(rev, plain) > 1e-2


def test_two_forwards_before_one_backward():
    """Gradient accumulation over micro-batches: per-call RNG bookkeeping, not per-module seeds."""
    model = _model(hash_seed=None)
    batches = [_ids(1), _ids(2)]
    _, plain = _step(model, reversible=False, seed=9, batches=batches)
    _, rev = _step(model, reversible=True, seed=9, batches=batches)
    assert _max_rel_err(rev, plain) <= 1e-5


def test_backward_leaves_global_rng_alone():
    model = _model(hash_seed=None)
    ids = _ids()
    torch.manual_seed(0)
    loss = model(ids, labels=ids).loss
    state = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_hash_seed_never_reseeds_global_rng():
    model = _model(hash_seed=11, **{k: 0.0 for k in DROPOUT}).eval()
    ids = _ids()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = model(ids).logits
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1)
    with torch.no_grad():
        second = model(ids).logits
    assert torch.equal(first, second)


def test_hash_seed_none_draws_from_global_rng():
    model = _model(hash_seed=None, attn_layers=("lsh", "lsh"), **{k: 0.0 for k in DROPOUT}).eval()
    ids = _ids()
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def _saved_bytes(model, ids) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=ids)
    return total


def test_reversible_stores_no_per_layer_activations():
    ids = _ids(batch=2, seq_len=32)
    sizes = {}
    for num_layers in (2, 6):
        model = _model(hash_seed=3, attn_layers=("lsh", "local") * (num_layers // 2))
        for reversible in (True, False):
            model.reformer.encoder.reversible = reversible
            sizes[num_layers, reversible] = _saved_bytes(model, ids)
    assert sizes[6, True] == sizes[2, True]
    assert sizes[6, False] > sizes[2, False] + 2 * 32 * 32 * 4 * 4


# >= 1024 rows, no dropout: both halves of every layer take the blocked CPU backward (no autograd around
# the layer; autograd on the attention op alone)
BLOCKED_CASES = {
    # LSH with two hash rounds and local attention, causal, two sequences of 576 positions
    "lsh2-local-causal": dict(attn_layers=("lsh", "local"), seq_len=576, batch=2, padding=False, is_decoder=True),
    # padding masks (right padding in row 0, left padding in row 1), bidirectional
    "local-lsh-mask": dict(attn_layers=("local", "lsh"), seq_len=576, batch=2, padding=True, is_decoder=False),
    # sequences no longer than a chunk: full attention inside each sequence, many sequences
    "full-attention-rows": dict(attn_layers=("lsh", "local"), seq_len=8, batch=160, padding=False, is_decoder=True),
}


@pytest.mark.parametrize("name", list(BLOCKED_CASES))
def test_blocked_reversible_backward_equals_autograd(name, monkeypatch):
    case = BLOCKED_CASES[name]
    seq_len, batch = case["seq_len"], case["batch"]
    axial = [24, 24] if seq_len == 576 else [2, 4]
    config = reformer.ReformerConfig(
        **tiny_config(
            is_decoder=case["is_decoder"],
            attn_layers=list(case["attn_layers"]),
            num_hashes=2,
            axial_pos_shape=axial,
            max_position_embeddings=seq_len,
        )
    )
    torch.manual_seed(0)
    model = (reformer.ReformerModelWithLMHead if case["is_decoder"] else reformer.ReformerForMaskedLM)(config).train()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "layer_norm" in param_name:
                param.normal_(mean=1.0 if param_name.endswith("weight") else 0.0, std=0.5)
    ids = _ids(batch=batch, seq_len=seq_len)
    kwargs = {}
    if case["padding"]:
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        mask[0, -100:] = 0
        mask[1, :60] = 0
        kwargs["attention_mask"] = mask

    calls = {"attention": 0, "feed_forward": 0}
    original_attention = reformer.reversible.attention_reverse_blocked

    def counted_attention(*args, **kw):
        calls["attention"] += 1
        return original_attention(*args, **kw)

    monkeypatch.setattr(reformer.reversible, "attention_reverse_blocked", counted_attention)
    feed_forward_cls = reformer.modules.ChunkReformerFeedForward
    original_feed_forward = feed_forward_cls.reverse_blocked

    def counted_feed_forward(self, *args, **kw):
        calls["feed_forward"] += 1
        return original_feed_forward(self, *args, **kw)

    monkeypatch.setattr(feed_forward_cls, "reverse_blocked", counted_feed_forward)

    def step(reversible):
        model.reformer.encoder.reversible = reversible
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_plain, plain = step(reversible=False)
    loss_rev, rev = step(reversible=True)
    num_layers = len(case["attn_layers"])
    assert calls == {"attention": num_layers, "feed_forward": num_layers}
    torch.testing.assert_close(loss_rev, loss_plain, rtol=1e-6, atol=0)
    assert _max_rel_err(rev, plain) <= 1e-5


def test_backward_recomputes_on_the_backend_the_forward_used():
    """Issue #13 item 2: the forward under ``backend("torch")``, the backward outside it (here under backend
    ``triton``, the Triton interpreter on CPU, which draws its dropout masks from another stream): the reversible
    backward must recompute with the forward's backend, so the gradients are those of an all-torch step."""
    import reformer_kernels

    model = _model()
    ids = _ids()

    def step(backward_backend: str):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with reformer_kernels.backend("torch"):
            loss = model(ids, labels=ids).loss
        with reformer_kernels.backend(backward_backend):
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    reference = step("torch")
    assert _max_rel_err(step("triton"), reference) <= 1e-6
