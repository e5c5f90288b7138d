"""``torch.compile`` of the model and the ops (issue #15), on CPU with the ``torch`` backend.

- Every registered operator (``torch.library``) passes ``torch.library.opcheck`` with representative small inputs
  (schema, autograd registration, fake implementation, AOT dispatch with dynamic shapes); the Triton operators,
  whose kernels run in the interpreter here, are checked in eager mode (schema and autograd registration).
- The eval forward of every head captures in one graph (``torch._dynamo.explain``: 0 graph breaks; ``fullgraph=True``
  works) and a training step too; compiled with inductor, logits equal eager within 1e-5 and gradients within 1e-4
  (relative).
- Value checks (id ranges) stay in the graph and still fail on bad input; a new sequence length recompiles once
  (dynamic shapes) and later lengths reuse that graph with eager's results; the ops backend is guarded.
- Cached decoding through a compiled model (the cache's steps run eagerly): eager's greedy tokens, and no
  recompile after the first steps.

``tests/test_compile.py`` is the ahead-of-time Triton compile test; this file is about ``torch.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._library.custom_ops import OPDEFS

import reformer
import reformer_kernels
from reformer.bench.harness import PRESETS
from reformer.modules import fast_path  # noqa: F401 - registers reformer::onednn_linear
from reformer_kernels.ops.axial_pos import triton as axial_triton  # noqa: F401 - registers the Triton ops
from reformer_kernels.ops.bucket_sort import triton as sort_triton  # noqa: F401
from reformer_kernels.ops.chunked_attention import triton as attention_triton  # noqa: F401
from reformer_kernels.ops.decode_attention import triton as decode_triton  # noqa: F401
from reformer_kernels.ops.lsh_hash import triton as hash_triton  # noqa: F401

OPS = torch.ops.reformer_kernels
# opcheck's tests for operators without an autograd formula of their own (integer outputs, or gradients)
NO_AUTOGRAD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
# the Triton operators: the interpreter's kernels cannot run on fake tensors, so only the eager tests
EAGER_ONLY = ("test_schema", "test_autograd_registration")

# harness' "tiny" preset (the suite's sizes) on a fixed 8 x 8 grid: 64 positions
TINY = {
    **PRESETS["tiny"],
    "num_buckets": 4,
    "axial_pos_shape": [8, 8],
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
HEADS = {
    "ReformerModel": {},
    "ReformerModelWithLMHead": {},
    "ReformerForMaskedLM": dict(is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=1),
    "ReformerForSequenceClassification": dict(is_decoder=False, num_labels=3),
    "ReformerForQuestionAnswering": dict(is_decoder=False, num_labels=2),
}


@pytest.fixture(autouse=True)
def _torch_backend_fresh_dynamo():
    torch._dynamo.reset()
    with reformer_kernels.backend("torch"):
        yield
    torch._dynamo.reset()


def _model(head: str = "ReformerModelWithLMHead", **overrides):
    torch.manual_seed(0)
    return getattr(reformer, head)(reformer.ReformerConfig(**{**TINY, **HEADS[head], **overrides}))


def _ids(seq_len: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randint(1, 64, (batch, seq_len), generator=torch.Generator().manual_seed(seq_len))


def _first_output(output) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no output tensor in {type(output).__name__}")


# --------------------------------------------------------------------------------------------------
# every registered operator passes opcheck
# --------------------------------------------------------------------------------------------------
def _opcheck_cases():
    """(name, operator, args, test_utils): representative small CPU inputs for every registered operator."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    B, H, L, D, R = 2, 2, 16, 8, 2
    vectors, rotations = randn(B, H, L, D), torch.randn(H, D, R, 3, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -3:] = False
    buckets = torch.randint(0, 5, (B, H, R * L), generator=gen)
    sorted_idx = torch.sort(buckets, dim=-1, stable=True).indices
    sorted_one = torch.sort(buckets[..., :L], dim=-1, stable=True).indices
    query, key, value = randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)
    heads_view = randn(B, L, H, D, grad=False).transpose(1, 2).requires_grad_()  # the model's layout
    grad_out = torch.randn(B, H, L, D, generator=gen)
    seed = torch.tensor([123])
    detached = [t.detach() for t in (query, key, value)]
    out_lsh, scale_lsh = OPS.chunked_attention_fwd(
        detached[0], None, detached[2], sorted_idx, mask, 4, 1, 0, True, 0, None
    )
    word, tables = randn(20, 12), [randn(4, 4), randn(4, 8)]
    ids, positions = torch.randint(0, 20, (B, L), generator=gen), torch.randint(0, 16, (B, L), generator=gen)
    word_mask, axial_mask = torch.rand(B, L, 12, generator=gen), torch.rand(B, 4, generator=gen)
    cache_key, cache_value = randn(B, H, 24, D), randn(B, H, 24, D)
    index = torch.randint(0, 24, (B, H, R, 8), generator=gen)
    key_start, self_index = torch.tensor([0, 3]), torch.tensor([5, 7])
    rows, weight, bias = randn(2, 1100, 16), randn(24, 16), randn(24)
    yield "lsh_hash", OPS.lsh_hash, (vectors, rotations, [2, 4], None, False), None
    yield "lsh_hash-mask", OPS.lsh_hash, (vectors, rotations, [6], mask, True), None
    yield "random_rotations", OPS.random_rotations, ([H, D, R, 3], 5, torch.device("cpu"), torch.float32), None
    yield "bucket_sort", OPS.bucket_sort, (buckets, 5), NO_AUTOGRAD
    yield (
        "chunked_attention_fwd-lsh",
        OPS.chunked_attention_fwd,
        (query, None, value, sorted_idx, mask, 4, 1, 0, True, 0.0, None),
        None,
    )
    yield (
        "chunked_attention_fwd-local",
        OPS.chunked_attention_fwd,
        (query, key, value, None, None, 4, 1, 1, False, 0.0, None),
        None,
    )
    yield (
        "chunked_attention_fwd-dropout-heads-view",
        OPS.chunked_attention_fwd,
        (heads_view, None, value, sorted_idx, None, 8, 1, 0, True, 0.2, seed),
        None,
    )
    yield (
        "chunked_attention_bwd",
        OPS.chunked_attention_bwd,
        (grad_out, detached[0], None, detached[2], sorted_idx, mask, out_lsh, scale_lsh, 4, 1, 0, True, 0.0, None),
        NO_AUTOGRAD,
    )
    yield (
        "chunked_attention_with_grad",
        OPS.chunked_attention_with_grad,
        (*detached, sorted_one, mask, grad_out, 4, 1, 0, True),
        NO_AUTOGRAD,
    )
    yield "axial_word_embedding_fwd-grid", OPS.axial_word_embedding_fwd, (ids, word, tables, None, None, None), None
    yield (
        "axial_word_embedding_fwd-positions",
        OPS.axial_word_embedding_fwd,
        (None, None, tables, positions, None, None),
        None,
    )
    yield (
        "axial_word_embedding_fwd-dropout",
        OPS.axial_word_embedding_fwd,
        (ids, word, tables, positions, word_mask, axial_mask),
        None,
    )
    yield (
        "axial_word_embedding_bwd",
        OPS.axial_word_embedding_bwd,
        (
            torch.randn(B, L, 12, generator=gen),
            ids,
            word.detach(),
            [t.detach() for t in tables],
            None,
            None,
            axial_mask,
        ),
        NO_AUTOGRAD,
    )
    decode_args = (
        query[:, :, 0].detach(),
        cache_key.detach(),
        cache_value.detach(),
        index,
        True,
        key_start,
        self_index,
    )
    yield "decode_attention", OPS.decode_attention, decode_args, NO_AUTOGRAD
    # an inference op: registered as not differentiable (its backward raises), see test_decode_attention_has_no_gradient
    yield (
        "decode_attention-requires-grad",
        OPS.decode_attention,
        (query[:, :, 0], *decode_args[1:]),
        ("test_autograd_registration",),
    )
    yield "onednn_linear", torch.ops.reformer.onednn_linear, (rows, weight, bias, True), None
    yield (
        "onednn_linear_backward",
        torch.ops.reformer.onednn_linear_backward,
        (torch.randn(2, 1100, 24, generator=gen), rows.detach(), weight.detach(), None, False),
        NO_AUTOGRAD,
    )
    # the Triton operators (interpreter on CPU): eager checks
    yield "lsh_hash_triton", OPS.lsh_hash_triton, (vectors, rotations, [2, 4], mask, False), EAGER_ONLY
    yield "bucket_sort_triton", OPS.bucket_sort_triton, (buckets, 5, None), ("test_schema",)
    yield (
        "chunked_attention_triton_fwd",
        OPS.chunked_attention_triton_fwd,
        (query, None, value, sorted_idx, mask, 4, 1, 0, True, 0.2, seed),
        EAGER_ONLY,
    )
    yield (
        "chunked_attention_triton_bwd",
        OPS.chunked_attention_triton_bwd,
        (
            grad_out,
            *detached,
            None,
            None,
            *OPS.chunked_attention_triton_fwd(*detached, None, None, 4, 1, 0, True, 0.0, None),
            4,
            1,
            0,
            True,
            0.0,
            None,
        ),
        ("test_schema",),
    )
    yield (
        "axial_word_embedding_triton_fwd",
        OPS.axial_word_embedding_triton_fwd,
        (ids, word, tables, positions, None, None, 0.0),
        EAGER_ONLY,
    )
    yield (
        "axial_word_embedding_triton_bwd",
        OPS.axial_word_embedding_triton_bwd,
        (
            torch.randn(B, L, 12, generator=gen),
            ids,
            word.detach(),
            [t.detach() for t in tables],
            None,
            None,
            None,
            0.0,
            [True, True, True],
        ),
        ("test_schema",),
    )
    yield (
        "decode_attention_triton",
        OPS.decode_attention_triton,
        (query[:, :, 0].detach(), cache_key.detach(), cache_value.detach(), index, True, key_start, self_index),
        ("test_schema",),
    )


_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("name,op,args,test_utils", _CASES, ids=[case[0] for case in _CASES])
def test_opcheck(name, op, args, test_utils):
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    result = torch.library.opcheck(op, args, **kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("op_name", ["chunked_attention_fwd", "chunked_attention_triton_fwd"])
def test_attention_backward_of_an_undefined_gradient_is_undefined(op_name):
    """The attention ops do not materialise zero gradients: an undefined output gradient (as
    ``gradcheck``'s undefined-grad check sends) gives undefined input gradients, not an error."""
    query, value = torch.randn(1, 2, 16, 8, requires_grad=True), torch.randn(1, 2, 16, 8, requires_grad=True)
    out = getattr(OPS, op_name)(query, None, value, None, None, 4, 1, 0, True, 0.0, None)[0]
    undefined = torch._C._functions.UndefinedGrad()(out)
    grads = torch.autograd.grad(undefined, (query, value), torch.ones_like(out), allow_unused=True)
    assert all(grad is None or not grad.any() for grad in grads)


def test_decode_attention_has_no_gradient():
    query, cache = torch.randn(1, 2, 8, requires_grad=True), torch.randn(1, 2, 12, 8)
    out = OPS.decode_attention(query, cache, cache, torch.zeros(1, 2, 1, 4, dtype=torch.long), False, None, None)
    with pytest.raises(RuntimeError, match="decode_attention .* has no gradient: it serves inference"):
        out.sum().backward()


def test_every_registered_operator_is_opchecked():
    registered = {name for name in OPDEFS if name.split("::")[0] in ("reformer_kernels", "reformer")}
    checked = {case[1]._qualified_op_name for case in _CASES}
    assert registered == checked, f"registered but not opchecked: {registered - checked}"


# --------------------------------------------------------------------------------------------------
# the model: one graph, equal to eager
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", list(HEADS))
def test_eval_forward_of_every_head_is_one_graph(head):
    model = _model(head).eval()
    ids, mask = _ids(), torch.ones(2, 32, dtype=torch.long)
    mask[1, 21:] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(ids, **kwargs)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            assert explained.graph_count == 1
            expected = _first_output(model(ids, **kwargs))
            got = _first_output(torch.compile(model, fullgraph=True, backend="aot_eager")(ids, **kwargs))
        assert torch.equal(got, expected)


def test_eval_with_padding_and_random_rotations_is_one_graph():
    """A length that is not a multiple of the chunks (padded inside), and ``hash_seed=None`` (rotations from the
    global RNG: traced as ``randn``)."""
    for model, seq_len in ((_model(), 27), (_model(hash_seed=None), 32)):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model.eval())(_ids(seq_len))
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_eval_inductor_fullgraph_equals_eager():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5


def test_train_step_is_one_graph_and_equals_eager():
    """The training forward (eager: the reversible Function) is one graph under compile (its layers run with plain
    autograd there); loss and gradients equal eager's."""
    model = _model().train()
    ids = _ids()
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()

    compiled_model = copy.deepcopy(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    compiled_loss = torch.compile(compiled_model, fullgraph=True)(ids, labels=ids).loss
    compiled_loss.backward()
    assert abs(compiled_loss.item() - loss.item()) <= 1e-5
    for (name, param), other in zip(model.named_parameters(), compiled_model.parameters()):
        if param.grad is None:
            assert other.grad is None, name
            continue
        error = (other.grad - param.grad).norm() / param.grad.norm().clamp_min(1e-12)
        assert error <= 1e-4, f"{name}: relative gradient error {error:.2e}"


def test_value_checks_stay_in_the_graph_and_fail_on_bad_ids():
    """Id-range checks are device asserts in the compiled graph (no host read, no break), and still stop bad input;
    eager raises the ValueError naming the argument."""
    model = _model().eval()
    bad = _ids()
    bad[1, 3] = 64  # outside the vocabulary
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(_ids())
        with pytest.raises(RuntimeError, match=r"input_ids \(config.vocab_size\) must be in \[0, upper\)"):
            compiled(bad)
        with pytest.raises(ValueError, match=r"input_ids \(config.vocab_size\) must be in \[0, 64\)"):
            model(bad)

    def sort(buckets):
        return reformer_kernels.bucket_sort(buckets, 4)[0] + 1

    compiled_sort = torch.compile(sort, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_sort(torch.tensor([[[3, 0, 2]]])), torch.tensor([[[2, 3, 1]]]))
    with pytest.raises(RuntimeError, match=r"buckets \(num_bins = 4\) must be in \[0, upper\)"):
        compiled_sort(torch.tensor([[[3, 4, 2]]]))


def test_a_new_length_recompiles_once_then_reuses_the_dynamic_graph():
    model = _model().eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    frames = []
    with torch.no_grad():
        for seq_len in (32, 48, 40, 64):
            ids = _ids(seq_len)
            assert torch.equal(compiled(ids).logits, model(ids).logits), seq_len
            frames.append(counter.frame_count)
    # the second length recompiles with a symbolic length; later multiples of the chunk length reuse it
    assert frames == [1, 2, 2, 2]


def test_the_ops_backend_is_guarded():
    """The backend is read while tracing: another backend recompiles instead of reusing the graph, and the
    Triton interpreter (CPU) cannot be traced: a ValueError says so."""
    query, value = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)

    def attend(q, v):
        return reformer_kernels.chunked_attention(q, None, v, None, 4, 1, 0, True)[0]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    expected = attend(query, value)
    assert torch.equal(compiled(query, value), expected) and counter.frame_count == 1
    with reformer_kernels.backend("auto"):
        assert torch.equal(compiled(query, value), expected) and counter.frame_count == 2
    assert torch.equal(compiled(query, value), expected) and counter.frame_count == 2
    with reformer_kernels.backend("triton"), pytest.raises(Exception, match="needs CUDA tensors"):
        compiled(query, value)


@pytest.mark.parametrize(
    "prompt_len, padded",
    [(5, True), (24, False)],
    ids=["prompt-below-a-chunk-left-padded", "prompt-of-three-chunks"],
)
def test_cached_decoding_under_inductor_equals_eager_and_stops_recompiling(prompt_len, padded):
    """Cached one-token steps through a compiled model: the cache's steps run eagerly (their host bookkeeping would
    specialise the graph on the cache length, or, once that length is made dynamic, give inductor code that fails
    with a NameError), the rest of each layer compiles. Greedy tokens equal eager's (a left-padded row included;
    the 5-token prompt hashes its LSH layer's cache inside a compiled step), logits within 1e-5, and after the
    first steps no step compiles again. Before the cache's steps ran eagerly, the first case recompiled at every
    step and the second failed inside inductor's generated code."""
    model = _model().eval()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    ids = _ids(prompt_len)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0  # row 1 left-padded
    results, frames = {}, []
    with torch.no_grad():
        for name, run in (("eager", model), ("compiled", compiled)):
            out = run(ids, attention_mask=mask, use_cache=True)
            cache, token = out.past_buckets_states, out.logits[:, -1:].argmax(-1)
            tokens, logits, step_mask = [token], [], mask
            for _ in range(12):
                step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
                out = run(token, attention_mask=step_mask, past_buckets_states=cache, use_cache=True)
                cache, token = out.past_buckets_states, out.logits[:, -1:].argmax(-1)
                tokens.append(token)
                logits.append(out.logits)
                frames.append(counter.frame_count)
            results[name] = torch.cat(tokens, dim=1), torch.cat(logits, dim=1)
    assert torch.equal(results["compiled"][0], results["eager"][0])
    assert (results["compiled"][1] - results["eager"][1]).abs().max().item() <= 1e-5
    compiled_frames = frames[12:]
    assert compiled_frames[0] > 0 and len(set(compiled_frames[3:])) == 1, compiled_frames
