"""Training at any length (issue #16 items 1 and 2; transformers raises in both cases).

1. Any length up to ``prod(axial_pos_shape)``: the positions go through the axial tables exactly as in eval (any
   number of axes); the gradients equal autograd through the same positions looked up by hand; training-time axial
   dropout is transformers' full-grid draw restricted to the positions used (both backends); a model trained on
   chunks of its position range runs at full length.
2. Lengths that are not a multiple of the chunk lengths: padded inside, the padded positions masked, the outputs
   trimmed; logits, loss and every parameter gradient equal those of the same batch padded by hand (zero
   ``attention_mask``, ``-100`` labels), and transformers' on that hand-padded batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from model_testing import hf_model, load_ours, max_abs, rel_err, tiny_config

import reformer
import reformer.reversible
import reformer_kernels

# internal and hand padding run the same arithmetic on the same shapes: they agree bit for bit today; the bound
# leaves room for a reduction over a different number of rows (the loss) only
EQUAL_RTOL = 1e-5
# against transformers (another implementation): test_parity's bounds
GRAD_RTOL = 1e-4
LOGITS_ATOL = 1e-4


def _model(class_name="ReformerModelWithLMHead", seed=0, **overrides):
    defaults = dict(is_decoder=class_name == "ReformerModelWithLMHead", attn_layers=["local", "lsh"])
    config = reformer.ReformerConfig(**tiny_config(**{**defaults, **overrides}))
    torch.manual_seed(seed)
    model = getattr(reformer, class_name)(config)
    with torch.no_grad():
        # non-trivial LayerNorms and position tables (the init leaves LayerNorms at 1 / 0)
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.5)
            elif "position_embeddings" in name:
                param.normal_()
    return model


def _ids(batch=2, seq_len=32, seed=4):
    return torch.randint(3, 37, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# Gradients that are exactly zero in exact arithmetic (test_parity's VANISHING_GRADS): QA's span softmax is invariant
# to a shift shared by all positions, which is all these can add; both sides are rounding noise (~1e-8) that depends
# on how many rows the products ran over, so they are checked to be ~0 instead.
VANISHING_GRADS = {"qa_outputs.bias", "reformer.encoder.layer_norm.bias"}
VANISHING_ATOL = 1e-6


def _assert_grads_equal(actual: dict, expected: dict, rtol: float = EQUAL_RTOL, qa: bool = False) -> None:
    # lm_head.bias is kept beside lm_head.decoder.bias and never added (transformers 5.24): no gradient anywhere
    expected = {name: grad for name, grad in expected.items() if not name.endswith("lm_head.bias")}
    actual = {name: grad for name, grad in actual.items() if not name.endswith("lm_head.bias")}
    assert set(actual) == set(expected)
    assert len(expected) >= 15
    for name, want in expected.items():
        got = actual[name]
        if qa and name in VANISHING_GRADS:
            assert got.norm() <= VANISHING_ATOL and want.norm() <= VANISHING_ATOL, name
            continue
        assert rel_err(got, want) <= rtol, (name, rel_err(got, want))


def _shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)


# ==================================================================================================
# 1. any length up to prod(axial_pos_shape)
# ==================================================================================================
def _hand_table(axial, batch_size: int) -> torch.Tensor:
    """transformers' training-time table without dropout: every factor broadcast over the whole grid, concatenated
    and flattened row-major, ``[B, prod(axial_pos_shape), hidden]``."""
    shape = axial.axial_pos_shape
    broadcast = [w.expand(batch_size, *shape, w.shape[-1]) for w in axial.weights]
    return torch.cat(broadcast, dim=-1).reshape(batch_size, math.prod(shape), -1)


AXES = {"2axes": ([8, 16], [12, 20]), "3axes": ([2, 4, 16], [8, 8, 16])}


@pytest.mark.parametrize("axes", list(AXES))
def test_sub_length_training_gradients_equal_hand_lookup(axes):
    """Training at 1/4 of prod(axial_pos_shape): the model's loss and gradients equal autograd through the first L
    rows of the broadcast grid, fed to the same encoder and head."""
    shape, dims = AXES[axes]
    model = _model(axial_pos_shape=shape, axial_pos_embds_dim=dims, max_position_embeddings=128).train()
    seq_len = math.prod(shape) // 4
    ids = _ids(seq_len=seq_len)
    labels = ids.clone()
    labels[:, ::5] = -100

    out = model(ids, labels=labels)
    out.loss.backward()
    actual = _grads(model)

    model.zero_grad(set_to_none=True)
    base = model.reformer
    embeddings = base.embeddings.word_embeddings(ids) + _hand_table(base.embeddings.position_embeddings, 2)[:, :seq_len]
    logits = model.lm_head(base.encoder(embeddings).hidden_states)
    loss = _shifted_lm_loss(logits, labels)
    loss.backward()
    expected = _grads(model)

    assert out.logits.shape == (2, seq_len, 37)
    assert max_abs(out.logits.detach(), logits.detach()) <= 1e-5
    assert abs(out.loss.item() - loss.item()) <= EQUAL_RTOL * loss.item()
    _assert_grads_equal(actual, expected)
    # only the factor rows the first quarter of the grid uses receive gradient
    stride, unused = math.prod(shape), 0
    for size, weight in zip(shape, base.embeddings.position_embeddings.weights):
        stride //= size
        used = min(size, math.ceil(seq_len / stride))
        grad = weight.grad.reshape(size, -1)
        assert (grad[:used].abs().sum(-1) > 0).all() and grad[used:].abs().sum() == 0
        unused += size - used
    assert unused > 0


def test_sub_length_training_matches_transformers_eval_lookup(tmp_path):
    """transformers looks positions up only in eval (it raises in training below prod, and its reversible backward
    needs training mode): with dropout 0, its model in training with the axial module alone in eval is the oracle of
    our training step at L = prod / 4."""
    config = tiny_config(
        is_decoder=True, attn_layers=["local", "lsh"], axial_pos_shape=[8, 16], max_position_embeddings=128
    )
    hf = hf_model("ReformerModelWithLMHead", **config)
    ours = load_ours(hf, tmp_path)
    ids = _ids(seq_len=32)
    hf.train()
    with pytest.raises(ValueError, match="multiply to"):
        hf(ids, labels=ids, use_cache=False)
    hf.reformer.embeddings.position_embeddings.eval()
    expected = hf(ids, labels=ids, use_cache=False)
    expected.loss.backward()
    actual = ours.train()(ids, labels=ids)
    actual.loss.backward()
    assert max_abs(actual.logits.detach(), expected.logits.detach()) <= LOGITS_ATOL
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5 * expected.loss.item()
    _assert_grads_equal(_grads(ours), _grads(hf), rtol=GRAD_RTOL)


@pytest.mark.parametrize("axes", list(AXES))
def test_sub_length_training_forward_equals_eval(axes):
    shape, dims = AXES[axes]
    model = _model(axial_pos_shape=shape, axial_pos_embds_dim=dims, max_position_embeddings=128)
    ids = _ids(seq_len=48)
    with torch.no_grad():
        evaluated = model.eval()(ids).logits
        trained = model.train()(ids).logits
    assert torch.equal(trained, evaluated)


DROPOUT_AXES = {"2axes": ([4, 8], [12, 20]), "3axes": ([2, 4, 4], [8, 8, 16])}
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not reformer_kernels.triton_available(), reason="no Triton")),
]


@pytest.mark.filterwarnings("ignore:dropout2d")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axes", list(DROPOUT_AXES))
def test_sub_length_axial_dropout_is_the_full_grid_draw(axes, backend, tmp_path):
    """Definition of the training-time axial dropout below prod: the multipliers transformers draws for the whole grid
    (dropout2d, one per batch row and axis-1 index), read at the positions used. Under one seed a sub-length, and any
    position ids, see exactly the entries of transformers' full-grid result."""
    shape, dims = DROPOUT_AXES[axes]
    config = tiny_config(
        attn_layers=["local"], axial_pos_shape=shape, axial_pos_embds_dim=dims, hidden_dropout_prob=0.3
    )
    hf = hf_model("ReformerModel", **config)
    ours = load_ours(hf, tmp_path)
    theirs_axial = hf.embeddings.position_embeddings.train()
    ours_axial = ours.embeddings.position_embeddings.train()
    total, batch = math.prod(shape), 3
    grid = torch.arange(total).expand(batch, total)
    torch.manual_seed(7)
    full = theirs_axial(grid)  # transformers: dropout2d over the broadcast grid
    assert (full == 0).all(-1).any() and not (full == 0).all(-1).all()
    permuted = torch.stack(
        [torch.randperm(total, generator=torch.Generator().manual_seed(row))[:11] for row in range(3)]
    )
    with reformer_kernels.backend(backend):
        for positions in (grid[:, : total // 4], grid[:, : total - 3], permuted):
            torch.manual_seed(7)
            got = ours_axial(positions)
            assert torch.equal(got, torch.gather(full, 1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1])))


def test_trained_on_chunks_runs_at_full_length_scaled(tmp_path):
    _trained_on_chunks_runs_at_full_length(tmp_path, [128, 256], 256)


@pytest.mark.slow
def test_trained_on_chunks_runs_at_full_length_crime_and_punishment_shape(tmp_path):
    """The published crime-and-punishment position grid (512 x 1024 = 524,288 positions) trained on 4,096-token
    chunks, then run at full length (tiny width)."""
    _trained_on_chunks_runs_at_full_length(tmp_path, [512, 1024], 4096)


def _trained_on_chunks_runs_at_full_length(tmp_path, axial_pos_shape, chunk):
    total = math.prod(axial_pos_shape)
    config = reformer.ReformerConfig(
        **tiny_config(
            hidden_size=8,
            num_attention_heads=1,
            attention_head_size=8,
            feed_forward_size=16,
            attn_layers=["local"],
            local_attn_chunk_length=64,
            lsh_attn_chunk_length=64,
            axial_pos_shape=axial_pos_shape,
            axial_pos_embds_dim=[4, 4],
            max_position_embeddings=total,
            is_decoder=True,
        )
    )
    torch.manual_seed(0)
    model = reformer.ReformerModelWithLMHead(config).train()
    before = [w.detach().clone() for w in model.reformer.embeddings.position_embeddings.weights]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        ids = _ids(batch=1, seq_len=chunk, seed=step)
        # chunks at different offsets of the grid
        position_ids = torch.arange(chunk) + step * (total - chunk)
        model(ids, position_ids=position_ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.reformer.embeddings.position_embeddings.weights
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    model.save_pretrained(tmp_path / "chunk-trained")
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "chunk-trained").eval()
    ids = _ids(batch=1, seq_len=total, seed=9)
    with torch.no_grad():
        full = loaded(ids).logits
        prefix = loaded(ids[:, :chunk]).logits
    assert full.shape == (1, total, 37) and bool(full.isfinite().all())
    # causal local attention: the first chunk's logits do not depend on what follows (up to the rounding of the
    # row-blocked CPU paths, which run at one length and not the other)
    assert max_abs(full[:, :chunk], prefix) <= 1e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_longer_than_the_tables_raises(training):
    axial = _model(axial_pos_shape=[4, 8], max_position_embeddings=64).train(training)
    with pytest.raises(ValueError, match=r"sequence length 40 exceeds the 32 positions .*prod\(config.axial_pos_shape"):
        axial(_ids(seq_len=40))
    short_max = _model(axial_pos_shape=[8, 8], max_position_embeddings=48).train(training)
    with pytest.raises(ValueError, match=r"sequence length 56 exceeds the 48 .*config.max_position_embeddings = 48"):
        short_max(_ids(seq_len=56))
    no_axial = _model(axial_pos_embds=False, max_position_embeddings=24).train(training)
    with pytest.raises(ValueError, match=r"sequence length 25 exceeds the 24 positions"):
        no_axial(_ids(seq_len=25))


# ==================================================================================================
# 2. lengths that are not a multiple of the chunk lengths
# ==================================================================================================
@dataclass
class Case:
    head: str
    config: dict = field(default_factory=dict)
    seq_len: int = 27
    mask: bool = False  # a user attention_mask (left padding in the last row)
    position_offset: int | None = None
    embeds: bool = False  # inputs_embeds instead of input_ids
    num_items: bool = False  # a Trainer-style num_items_in_batch
    # position ids the hand-padded batch needs for its padded positions (None: continue the real ones)
    hand_pad_positions: list[int] | None = None


DROPOUT = dict(hidden_dropout_prob=0.2, local_attention_probs_dropout_prob=0.2, lsh_attention_probs_dropout_prob=0.2)
CASES = {
    "lm-local-lsh": Case("ReformerModelWithLMHead", dict(num_hashes=2), num_items=True),
    "lm-dropout": Case("ReformerModelWithLMHead", dict(attn_layers=["lsh", "local"], **DROPOUT)),
    "lm-mixed-chunks": Case(
        "ReformerModelWithLMHead",
        dict(lsh_attn_chunk_length=4, local_attn_chunk_length=8, axial_pos_shape=[8, 8], max_position_embeddings=64),
        seq_len=43,
    ),
    "mlm-mask": Case("ReformerForMaskedLM", dict(attn_layers=["lsh", "local"], num_hashes=2), mask=True),
    "mlm-position-ids": Case("ReformerForMaskedLM", dict(axial_pos_shape=[8, 8]), seq_len=21, position_offset=30),
    "classification": Case("ReformerForSequenceClassification", dict(num_labels=3), mask=True),
    "qa": Case("ReformerForQuestionAnswering", dict(attn_layers=["lsh", "local"])),
    "model-inputs-embeds": Case("ReformerModel", embeds=True, mask=True),
    "3axes-sub-length": Case(
        "ReformerModelWithLMHead",
        dict(axial_pos_shape=[2, 4, 16], axial_pos_embds_dim=[8, 8, 16], max_position_embeddings=128),
        seq_len=45,
    ),
    # prod(axial_pos_shape) = 36 is no multiple of the chunk length 8: the four padded positions are clamped to 35
    "padded-past-the-grid": Case(
        "ReformerForMaskedLM",
        dict(axial_pos_shape=[4, 9], axial_pos_embds_dim=[12, 20], max_position_embeddings=64),
        seq_len=36,
        hand_pad_positions=[35] * 4,
    ),
    "no-axial-padded-past-max-positions": Case(
        "ReformerModelWithLMHead",
        dict(axial_pos_embds=False, max_position_embeddings=30),
        seq_len=30,
        hand_pad_positions=[29, 29],
    ),
}


def _batch(case: Case, num_labels: int):
    """The real batch (as the user passes it) and its targets."""
    generator = torch.Generator().manual_seed(1)
    batch, seq_len = 2, case.seq_len
    ids = torch.randint(3, 37, (batch, seq_len), generator=generator)
    inputs = {"input_ids": ids}
    if case.mask:
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        mask[-1, :4] = 0
        inputs["attention_mask"] = mask
    if case.position_offset is not None:
        inputs["position_ids"] = (torch.arange(seq_len) + case.position_offset).expand(batch, seq_len)
    targets = {}
    if case.head in ("ReformerModelWithLMHead", "ReformerForMaskedLM"):
        labels = ids.clone()
        labels[:, ::3] = -100
        targets["labels"] = labels
    elif case.head == "ReformerForSequenceClassification":
        targets["labels"] = torch.randint(0, num_labels, (batch,), generator=generator)
    elif case.head == "ReformerForQuestionAnswering":
        targets["start_positions"] = torch.randint(0, seq_len, (batch,), generator=generator)
        targets["end_positions"] = torch.randint(0, seq_len, (batch,), generator=generator)
    return inputs, targets


def _pad_by_hand(case: Case, inputs: dict, targets: dict, padded_len: int, pad_token_id: int):
    """The same batch padded by hand: pad tokens, a zero attention_mask and -100 labels over the padding."""
    ids = inputs["input_ids"]
    batch, seq_len = ids.shape
    extra = padded_len - seq_len
    padded = {"input_ids": torch.cat([ids, torch.full((batch, extra), pad_token_id, dtype=ids.dtype)], dim=1)}
    mask = inputs.get("attention_mask", torch.ones(batch, seq_len, dtype=torch.long))
    padded["attention_mask"] = torch.cat([mask, torch.zeros(batch, extra, dtype=mask.dtype)], dim=1)
    if "position_ids" in inputs:
        padded["position_ids"] = torch.arange(padded_len).expand(batch, padded_len) + case.position_offset
    elif case.hand_pad_positions is not None:
        positions = torch.cat([torch.arange(seq_len), torch.tensor(case.hand_pad_positions)])
        padded["position_ids"] = positions.expand(batch, padded_len)
    padded_targets = dict(targets)
    if "labels" in targets and targets["labels"].dim() == 2:
        padded_targets["labels"] = torch.cat([targets["labels"], torch.full((batch, extra), -100)], dim=1)
    return padded, padded_targets


def _outputs(out, head: str, seq_len: int) -> list[torch.Tensor]:
    """The head's outputs over the real positions."""
    if head == "ReformerModel":
        return [out.last_hidden_state[:, :seq_len]]
    if head == "ReformerForQuestionAnswering":
        return [out.start_logits[:, :seq_len], out.end_logits[:, :seq_len]]
    if head == "ReformerForSequenceClassification":
        return [out.logits]
    return [out.logits[:, :seq_len]]


def _loss(out, case: Case, targets: dict, seq_len: int) -> torch.Tensor:
    """The head's own loss, except where the padded positions must be kept out by trimming: QA's span softmax runs
    over the positions (transformers does not mask padded ones there), the base model has no loss."""
    if case.head == "ReformerModel":
        hidden = out.last_hidden_state[:, :seq_len]
        weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
        return (hidden * weights).sum()
    if case.head == "ReformerForQuestionAnswering":
        start, end = out.start_logits[:, :seq_len], out.end_logits[:, :seq_len]
        loss = F.cross_entropy(start, targets["start_positions"]) + F.cross_entropy(end, targets["end_positions"])
        return loss / 2
    return out.loss


def _run(model, case: Case, inputs: dict, targets: dict, seq_len: int, call: dict):
    model.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    if case.embeds:
        inputs["inputs_embeds"] = model.get_input_embeddings()(inputs.pop("input_ids"))
    torch.manual_seed(11)  # the dropout cases draw the same masks on both sides
    out = model(**inputs, **targets, **call, output_hidden_states=True)
    loss = _loss(out, case, targets, seq_len)
    loss.backward()
    return out, loss.detach(), _grads(model)


@pytest.mark.parametrize("name", list(CASES))
def test_non_multiple_training_equals_hand_padded(name, monkeypatch):
    case = CASES[name]
    model = _model(case.head, **case.config).train()
    config = model.config
    lcm = config.least_common_mult_chunk_length()
    seq_len = case.seq_len
    assert seq_len % lcm != 0
    padded_len = seq_len + lcm - seq_len % lcm
    inputs, targets = _batch(case, config.num_labels)
    hand_inputs, hand_targets = _pad_by_hand(case, inputs, targets, padded_len, config.pad_token_id)
    call = {}
    if case.num_items:
        num_items = int((F.pad(targets["labels"], (0, 1), value=-100)[:, 1:] != -100).sum())
        call["num_items_in_batch"] = torch.tensor(num_items)

    out, loss, grads = _run(model, case, inputs, targets, seq_len, call)
    if case.hand_pad_positions is not None:
        # the hand-padded batch is longer than the tables, which the model refuses; its positions are in range
        monkeypatch.setattr(model.base_model, "_num_positions", lambda: padded_len)
    hand_out, hand_loss, hand_grads = _run(model, case, hand_inputs, hand_targets, seq_len, call)

    for got, want in zip(_outputs(out, case.head, seq_len), _outputs(hand_out, case.head, seq_len), strict=True):
        assert got.shape == want.shape
        assert max_abs(got.detach(), want.detach()) <= 1e-6 * max(1.0, want.abs().max().item())
    # trimmed to the real length
    for key in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        if key in out and not (key == "logits" and case.head == "ReformerForSequenceClassification"):
            assert out[key].shape[1] == seq_len, key
    # hidden states keep the padded length, as in eval (and as transformers returns them)
    for got, want in zip(out.hidden_states, hand_out.hidden_states, strict=True):
        assert got.shape[1] == padded_len and max_abs(got, want) <= 1e-6 * max(1.0, want.abs().max().item())
    assert abs(loss.item() - hand_loss.item()) <= EQUAL_RTOL * abs(hand_loss.item())
    _assert_grads_equal(grads, hand_grads, qa=case.head == "ReformerForQuestionAnswering")


TRANSFORMERS_CASES = [
    name
    for name, case in CASES.items()
    if case.config.get("hidden_dropout_prob", 0) == 0
    and math.prod(tiny_config(**case.config)["axial_pos_shape"]) == 32
    and case.seq_len == 27
    and tiny_config(**case.config).get("axial_pos_embds", True)
]


@pytest.mark.parametrize("name", TRANSFORMERS_CASES)
def test_non_multiple_training_matches_transformers_hand_padded(name, tmp_path):
    """transformers trains only at L = prod(axial_pos_shape) and a multiple of the chunk lengths: the hand-padded
    batch (27 → 32 = prod) is its input; ours gets the unpadded one."""
    case = CASES[name]
    defaults = dict(is_decoder=case.head == "ReformerModelWithLMHead", attn_layers=["local", "lsh"])
    hf = hf_model(case.head, **tiny_config(**{**defaults, **case.config}))
    ours = load_ours(hf, tmp_path)
    hf.train()
    ours.train()
    seq_len = case.seq_len
    inputs, targets = _batch(case, hf.config.num_labels)
    hand_inputs, hand_targets = _pad_by_hand(case, inputs, targets, 32, hf.config.pad_token_id)
    extra = {"use_cache": False} if case.head in ("ReformerModelWithLMHead", "ReformerModel") else {}
    call = {}
    if case.num_items:
        num_items = int((F.pad(targets["labels"], (0, 1), value=-100)[:, 1:] != -100).sum())
        call["num_items_in_batch"] = torch.tensor(num_items)

    out, loss, grads = _run(ours, case, inputs, targets, seq_len, call)
    expected_out, expected_loss, expected = _run(hf, case, hand_inputs, hand_targets, seq_len, {**call, **extra})

    for got, want in zip(_outputs(out, case.head, seq_len), _outputs(expected_out, case.head, seq_len), strict=True):
        assert got.shape == want.shape and max_abs(got.detach(), want.detach()) <= LOGITS_ATOL
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * max(1.0, abs(expected_loss.item()))
    _assert_grads_equal(grads, expected, rtol=GRAD_RTOL, qa=case.head == "ReformerForQuestionAnswering")


def test_blocked_reversible_backward_with_internal_padding(tmp_path, monkeypatch):
    """>= 1024 rows, no dropout: every layer takes the blocked CPU backward with the padded mask. 1,020 tokens are
    padded to 1,024 inside; transformers gets the hand-padded batch (its training needs L = prod = 1,024)."""
    config = tiny_config(
        attn_layers=["lsh", "local"], num_hashes=2, axial_pos_shape=[32, 32], max_position_embeddings=1024
    )
    hf = hf_model("ReformerForMaskedLM", **config)
    ours = load_ours(hf, tmp_path)
    hf.train()
    ours.train()
    case = Case("ReformerForMaskedLM", seq_len=1020, mask=True)
    inputs, targets = _batch(case, 2)
    inputs = {k: v[:1] for k, v in inputs.items()}
    targets = {k: v[:1] for k, v in targets.items()}
    inputs["attention_mask"][0, :4] = 0
    hand_inputs, hand_targets = _pad_by_hand(case, inputs, targets, 1024, 0)

    calls = []
    original = reformer.reversible.attention_reverse_blocked

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attention_mask", args[5] if len(args) > 5 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(reformer.reversible, "attention_reverse_blocked", counted)
    out, loss, grads = _run(ours, case, inputs, targets, 1020, {})
    assert len(calls) == 2 and all(mask is not None and mask.shape == (1, 1024) for mask in calls)
    hand_out, hand_loss, hand_grads = _run(ours, case, hand_inputs, hand_targets, 1020, {})
    expected_out, expected_loss, expected = _run(hf, case, hand_inputs, hand_targets, 1020, {})

    assert torch.equal(out.logits, hand_out.logits[:, :1020])
    assert abs(loss.item() - hand_loss.item()) <= EQUAL_RTOL * hand_loss.item()
    _assert_grads_equal(grads, hand_grads)
    assert max_abs(out.logits.detach(), expected_out.logits[:, :1020].detach()) <= LOGITS_ATOL
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * expected_loss.item()
    _assert_grads_equal(grads, expected, rtol=GRAD_RTOL)
