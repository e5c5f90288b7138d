"""Parity with transformers' Reformer (the oracle) on random-weight checkpoints saved by transformers.

Eval: logits (≤ 1e-4 max-abs), hidden states, attentions, loss. Train (dropout 0, hash_seed set):
loss and every parameter's gradient (≤ 1e-4 relative ‖g − g_ref‖ / ‖g_ref‖). ``lm_head.decoder.bias`` is
random and added; ``lm_head.bias`` is kept beside it and never added (transformers 5.24), so it has no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from model_testing import hf_model, load_ours, max_abs, tiny_config

LOGITS_ATOL = 1e-4
GRAD_RTOL = 1e-4
# Gradients that are exactly zero in exact arithmetic: QA's start/end softmax over positions is
# invariant to a shift shared by all positions, which is all these two parameters can add. Both sides
# are rounding noise there (~1e-8, depending on the reduction order), so they are checked to be ~0
# instead of being compared with each other.
VANISHING_GRADS = {"ReformerForQuestionAnswering": {"qa_outputs.bias", "reformer.encoder.layer_norm.bias"}}
VANISHING_ATOL = 1e-6


def _check_grad(name: str, got: torch.Tensor, want: torch.Tensor, head: str) -> None:
    if name in VANISHING_GRADS.get(head, ()):
        assert got.norm() <= VANISHING_ATOL and want.norm() <= VANISHING_ATOL, name
        return
    error = (got.double() - want.double()).norm().item()
    assert error <= GRAD_RTOL * want.double().norm().item(), (name, error, want.norm().item())


@dataclass
class Case:
    head: str
    config: dict
    seq_len: int = 32
    batch: int = 2
    padding_mask: bool = False
    modes: tuple = ("eval", "train")
    call: dict = field(default_factory=dict)


CASES = {
    "lm-local-lsh-R1": Case("ReformerModelWithLMHead", dict(is_decoder=True, attn_layers=["local", "lsh", "local"])),
    "lm-lsh-R3": Case("ReformerModelWithLMHead", dict(is_decoder=True, attn_layers=["lsh", "lsh"], num_hashes=3)),
    "lm-mask-R2": Case(
        "ReformerModelWithLMHead", dict(is_decoder=True, attn_layers=["lsh", "local"], num_hashes=2), padding_mask=True
    ),
    "lm-noaxial-ffchunk-lmchunk": Case(
        "ReformerModelWithLMHead",
        dict(
            is_decoder=True,
            attn_layers=["local", "lsh"],
            axial_pos_embds=False,
            chunk_size_feed_forward=8,
            chunk_size_lm_head=8,
            hidden_act="gelu",
        ),
    ),
    "lm-lcm16-before2": Case(
        "ReformerModelWithLMHead",
        dict(
            is_decoder=True,
            attn_layers=["lsh", "local"],
            local_attn_chunk_length=16,
            lsh_num_chunks_before=2,
            num_hashes=2,
        ),
    ),
    "mlm-after1-R2-mask": Case(
        "ReformerForMaskedLM",
        dict(
            is_decoder=False,
            attn_layers=["lsh", "local", "lsh"],
            num_hashes=2,
            lsh_num_chunks_after=1,
            local_num_chunks_after=1,
        ),
        padding_mask=True,
    ),
    "mlm-before0-after2": Case(
        "ReformerForMaskedLM",
        dict(
            is_decoder=False,
            attn_layers=["lsh", "local"],
            lsh_num_chunks_before=0,
            lsh_num_chunks_after=2,
            local_num_chunks_after=1,
        ),
    ),
    "base-factorized-buckets": Case(
        "ReformerModel",
        dict(
            attn_layers=["lsh", "local"],
            num_buckets=[2, 4],
            num_hashes=2,
            axial_pos_shape=[8, 8],
            max_position_embeddings=64,
        ),
        seq_len=64,
    ),
    "base-3axis": Case(
        "ReformerModel",
        dict(attn_layers=["local", "lsh"], axial_pos_shape=[2, 4, 4], axial_pos_embds_dim=[8, 8, 16]),
        modes=("train",),
    ),
    "seqcls-shorter-than-chunk": Case(
        "ReformerForSequenceClassification",
        dict(attn_layers=["lsh", "local"], num_labels=3, axial_pos_shape=[2, 3], num_hashes=2),
        seq_len=6,
        batch=3,
    ),
    "lm-shorter-than-chunk-mask": Case(
        "ReformerModelWithLMHead",
        dict(is_decoder=True, attn_layers=["lsh", "local"], num_hashes=2, axial_pos_shape=[2, 3]),
        seq_len=6,
        padding_mask=True,
    ),
    "seqcls-regression-mask": Case(
        "ReformerForSequenceClassification", dict(attn_layers=["local", "lsh"], num_labels=1), padding_mask=True
    ),
    "qa-mask": Case(
        "ReformerForQuestionAnswering", dict(attn_layers=["lsh", "local"], num_hashes=2), padding_mask=True
    ),
    # eval only: transformers pads to a multiple of the chunk length and trims
    "lm-eval-padding": Case(
        "ReformerModelWithLMHead", dict(is_decoder=True, attn_layers=["local", "lsh"]), seq_len=27, modes=("eval",)
    ),
    "mlm-eval-padding-mask": Case(
        "ReformerForMaskedLM",
        dict(is_decoder=False, attn_layers=["lsh", "local"], num_hashes=2, lsh_num_chunks_after=1),
        seq_len=21,
        padding_mask=True,
        modes=("eval",),
    ),
    "lm-eval-num-hashes-arg": Case(
        "ReformerModelWithLMHead",
        dict(is_decoder=True, attn_layers=["lsh", "local", "lsh"]),
        modes=("eval",),
        call=dict(num_hashes=3),
    ),
    "mlm-eval-num-hashes-arg-mask": Case(
        "ReformerForMaskedLM",
        dict(attn_layers=["lsh", "lsh"], lsh_num_chunks_after=1),
        padding_mask=True,
        modes=("eval",),
        call=dict(num_hashes=2),
    ),
    # >= 1024 rows: the blocked oneDNN CPU paths (fused LayerNorm + projections, blocked feed-forward and its
    # blocked reversible backward, final LayerNorm without the cat) run, over two row blocks and a tail
    "lm-long-cpu-blocked-paths": Case(
        "ReformerModelWithLMHead",
        dict(
            is_decoder=True,
            attn_layers=["local", "lsh"],
            num_hashes=2,
            axial_pos_shape=[48, 48],
            max_position_embeddings=2304,
        ),
        seq_len=2304,
        batch=1,
    ),
    "mlm-long-cpu-blocked-paths-mask": Case(
        "ReformerForMaskedLM",
        dict(
            is_decoder=False,
            attn_layers=["lsh", "local"],
            axial_pos_shape=[32, 34],
            max_position_embeddings=1088,
            hidden_act="gelu",
        ),
        seq_len=1088,
        padding_mask=True,
    ),
    "base-eval-position-ids": Case(
        "ReformerModel",
        dict(attn_layers=["local", "lsh"], axial_pos_shape=[8, 8]),
        modes=("eval",),
        call=dict(position_ids_offset=5),
    ),
}


def _inputs(case: Case, vocab_size: int, num_labels: int):
    generator = torch.Generator().manual_seed(1)
    batch, seq_len = case.batch, case.seq_len
    input_ids = torch.randint(3, vocab_size, (batch, seq_len), generator=generator)
    kwargs = {"input_ids": input_ids}
    if case.padding_mask:
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        # right padding in row 0, left padding in the last row (5 and 3 positions at length 32); scaled with
        # the length so that short sequences keep several visible keys per query
        mask[0, seq_len - max(1, seq_len // 6) :] = 0
        mask[-1, : max(1, seq_len // 10)] = 0
        kwargs["attention_mask"] = mask
    offset = case.call.get("position_ids_offset")
    if offset is not None:
        kwargs["position_ids"] = (torch.arange(seq_len) + offset).expand(batch, seq_len)
    if "num_hashes" in case.call:
        kwargs["num_hashes"] = case.call["num_hashes"]
    labels = {}
    if case.head in ("ReformerModelWithLMHead", "ReformerForMaskedLM"):
        target = input_ids.clone()
        target[:, ::3] = -100
        labels["labels"] = target
    elif case.head == "ReformerForSequenceClassification":
        labels["labels"] = (
            torch.randint(0, num_labels, (batch,), generator=generator)
            if num_labels > 1
            else torch.randn(batch, generator=generator)
        )
    elif case.head == "ReformerForQuestionAnswering":
        labels["start_positions"] = torch.randint(0, seq_len, (batch,), generator=generator)
        labels["end_positions"] = torch.randint(0, seq_len, (batch,), generator=generator)
    return kwargs, labels


def _primary(out, head: str) -> list[torch.Tensor]:
    if head == "ReformerModel":
        return [out.last_hidden_state]
    if head == "ReformerForQuestionAnswering":
        return [out.start_logits, out.end_logits]
    return [out.logits]


def _models(case: Case, tmp_path):
    config = tiny_config(**case.config)
    hf = hf_model(case.head, **config)
    ours = load_ours(hf, tmp_path)
    return hf, ours


EVAL_CASES = [name for name, case in CASES.items() if "eval" in case.modes]
TRAIN_CASES = [name for name, case in CASES.items() if "train" in case.modes]


def _loss(out, head: str, labels: dict) -> torch.Tensor:
    if head == "ReformerModel":
        # a fixed random projection of the output gives every parameter a non-trivial gradient
        weights = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(2))
        return (out.last_hidden_state * weights).sum()
    assert labels
    return out.loss


@pytest.mark.parametrize("name", EVAL_CASES)
def test_eval_parity(name, tmp_path):
    case = CASES[name]
    hf, ours = _models(case, tmp_path)
    hf.eval()
    ours.eval()
    kwargs, labels = _inputs(case, hf.config.vocab_size, hf.config.num_labels)
    extra = {} if case.head in ("ReformerForMaskedLM", "ReformerForQuestionAnswering") else {"use_cache": False}
    with torch.no_grad():
        expected = hf(**kwargs, **labels, **extra, output_hidden_states=True, output_attentions=True)
        actual = ours(**kwargs, **labels, output_hidden_states=True, output_attentions=True)

    for got, want in zip(_primary(actual, case.head), _primary(expected, case.head)):
        assert got.shape == want.shape
        assert max_abs(got, want) <= LOGITS_ATOL
    if labels:
        assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    assert len(actual.hidden_states) == len(expected.hidden_states) == hf.config.num_hidden_layers + 1
    for got, want in zip(actual.hidden_states, expected.hidden_states):
        assert max_abs(got, want) <= LOGITS_ATOL
    assert len(actual.attentions) == len(expected.attentions) == hf.config.num_hidden_layers
    for got, want in zip(actual.attentions, expected.attentions):
        assert max_abs(got, want) <= 1e-5
    # the automatic num_buckets rule wrote the same value into both configs
    assert ours.config.num_buckets == hf.config.num_buckets


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_train_parity_gradients(name, tmp_path):
    case = CASES[name]
    hf, ours = _models(case, tmp_path)
    hf.train()
    ours.train()
    kwargs, labels = _inputs(case, hf.config.vocab_size, hf.config.num_labels)
    extra = {} if case.head in ("ReformerForMaskedLM", "ReformerForQuestionAnswering") else {"use_cache": False}
    expected = hf(**kwargs, **labels, **extra)
    expected_loss = _loss(expected, case.head, labels)
    expected_loss.backward()
    actual = ours(**kwargs, **labels)
    actual_loss = _loss(actual, case.head, labels)
    actual_loss.backward()

    assert abs(actual_loss.item() - expected_loss.item()) <= 1e-5 * max(1.0, abs(expected_loss.item()))
    for got, want in zip(_primary(actual, case.head), _primary(expected, case.head)):
        assert max_abs(got.detach(), want.detach()) <= LOGITS_ATOL
    reference = dict(hf.named_parameters())
    assert set(reference) == {name for name, _ in ours.named_parameters()}
    checked = 0
    for param_name, param in ours.named_parameters():
        if param_name.endswith("lm_head.bias"):
            # kept beside lm_head.decoder.bias and never added (transformers 5.24): no gradient anywhere
            assert param.grad is None and reference[param_name].grad is None
            continue
        assert param.grad is not None, f"{param_name} got no gradient"
        _check_grad(param_name, param.grad, reference[param_name].grad, case.head)
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("name", [name for name in EVAL_CASES if "long-cpu" in name])
def test_eval_parity_in_place_streams(name, tmp_path):
    """Without output_hidden_states the blocked CPU paths update the two streams in place: the logits
    still match transformers, and the caller's inputs_embeds (both streams at the first layer) is untouched."""
    case = CASES[name]
    hf, ours = _models(case, tmp_path)
    hf.eval()
    ours.eval()
    kwargs, _ = _inputs(case, hf.config.vocab_size, hf.config.num_labels)
    extra = {} if case.head == "ReformerForMaskedLM" else {"use_cache": False}
    with torch.no_grad():
        expected = hf(**kwargs, **extra).logits
        embeds = ours.get_input_embeddings()(kwargs["input_ids"])
        kept = embeds.clone()
        from_ids = ours(**kwargs).logits
        from_embeds = ours(inputs_embeds=embeds, **{k: v for k, v in kwargs.items() if k != "input_ids"}).logits
    assert max_abs(from_ids, expected) <= LOGITS_ATOL
    assert max_abs(from_embeds, expected) <= LOGITS_ATOL
    assert torch.equal(embeds, kept)


@pytest.mark.parametrize("head", ["ReformerModelWithLMHead", "ReformerForMaskedLM"])
def test_eval_parity_hash_seed_none_draws_like_transformers(head, tmp_path):
    """Without hash_seed both draw the rotations from the global RNG, in the same order and dtype."""
    config = tiny_config(
        hash_seed=None, is_decoder=head == "ReformerModelWithLMHead", attn_layers=["lsh", "local", "lsh"], num_hashes=2
    )
    hf = hf_model(head, **config).eval()
    ours = load_ours(hf, tmp_path).eval()
    ids = torch.randint(3, 37, (2, 32), generator=torch.Generator().manual_seed(8))
    extra = {"use_cache": False} if head == "ReformerModelWithLMHead" else {}
    with torch.no_grad():
        torch.manual_seed(99)
        expected = hf(ids, **extra).logits
        torch.manual_seed(99)
        actual = ours(ids).logits
        torch.manual_seed(100)
        other_draw = ours(ids).logits
    assert max_abs(actual, expected) <= LOGITS_ATOL
    assert max_abs(other_draw, expected) > 1e-3  # the rotations do come from the global RNG


@pytest.mark.skipif(not __import__("reformer_kernels").triton_available(), reason="Triton is not installed")
def test_triton_backend_parity(device, tmp_path):
    """The model with every op on the Triton backend (the interpreter on CPU, per conftest) against
    transformers. Kernel limits: head_dim and chunk lengths >= 16 and powers of two."""
    import reformer_kernels

    config = tiny_config(
        is_decoder=True,
        attn_layers=["lsh", "local"],
        attention_head_size=16,
        lsh_attn_chunk_length=16,
        local_attn_chunk_length=16,
        num_hashes=2,
    )
    hf = hf_model("ReformerModelWithLMHead", **config).to(device)
    ours = load_ours(hf, tmp_path).to(device)
    ids = torch.randint(3, 37, (2, 32), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    hf.eval()
    ours.eval()
    with torch.no_grad(), reformer_kernels.backend("triton"):
        expected = hf(ids, attention_mask=mask, use_cache=False).logits
        actual = ours(ids, attention_mask=mask).logits
    assert max_abs(actual, expected) <= LOGITS_ATOL

    hf.train()
    ours.train()
    hf(ids, labels=ids, use_cache=False).loss.backward()
    with reformer_kernels.backend("triton"):
        ours(ids, labels=ids).loss.backward()
    reference = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        want = reference[name].grad
        if want is None:
            assert name.endswith("lm_head.bias")
            continue
        _check_grad(name, param.grad, want, "ReformerModelWithLMHead")
