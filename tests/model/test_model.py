"""Model behaviour beyond numerical parity: bad input, output containers, axial embeddings, init."""

from __future__ import annotations

import math

import pytest
import torch
from model_testing import hf_model, load_ours, max_abs, tiny_config

import reformer
from reformer.modeling_reformer import AxialPositionEmbeddings, ReformerEmbeddings


def _model(class_name="ReformerModelWithLMHead", **overrides):
    defaults = dict(is_decoder=class_name == "ReformerModelWithLMHead", attn_layers=["local", "lsh"])
    torch.manual_seed(0)
    return getattr(reformer, class_name)(reformer.ReformerConfig(**tiny_config(**{**defaults, **overrides})))


def _ids(batch=2, seq_len=32):
    return torch.randint(3, 37, (batch, seq_len), generator=torch.Generator().manual_seed(4))


# --------------------------------------------------------------------------------------------------
# bad input → ValueError naming the argument / field, before anything runs
# --------------------------------------------------------------------------------------------------
def test_training_pads_to_a_multiple_of_chunk_length():
    """transformers raises in training unless L is a multiple of the chunk lengths; here it is padded inside (the
    equality with the hand-padded batch is in test_any_length.py). 36 → 40 also passes prod(axial_pos_shape) = 36:
    the padded positions are clamped into the grid."""
    model = _model(axial_pos_shape=[4, 9], axial_pos_embds_dim=[12, 20], max_position_embeddings=64).train()
    ids = _ids(seq_len=36)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.shape == (2, 36, 37)


def test_sequence_length_up_to_the_axial_grid_in_training_and_eval():
    model = _model().train()  # axial_pos_shape [4, 8] → 32 positions
    assert model(_ids(seq_len=16)).logits.shape == (2, 16, 37)  # transformers: training needs L == 32
    with pytest.raises(ValueError, match=r"sequence length 40 exceeds the 32 positions .*axial_pos_shape \[4, 8\]"):
        model(_ids(seq_len=40))
    model.eval()
    with torch.no_grad():
        assert model(_ids(seq_len=16)).logits.shape == (2, 16, 37)
        with pytest.raises(ValueError, match=r"sequence length 40 exceeds the 32 positions"):
            model(_ids(seq_len=40))
        with pytest.raises(ValueError, match=r"axial_pos_shape \[4, 8\] must multiply to at least"):
            model.reformer.embeddings(input_ids=_ids(seq_len=40))


def test_input_ids_out_of_vocabulary():
    model = _model().eval()
    ids = _ids()
    ids[1, 3] = 37
    with pytest.raises(ValueError, match=r"input_ids \(config.vocab_size\) must be in \[0, 37\)"):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


def test_position_ids_out_of_range():
    model = _model().eval()
    with pytest.raises(ValueError, match=r"position_ids .* must be in \[0, 32\)"):
        model(_ids(seq_len=16), position_ids=torch.arange(16) + 20)
    no_axial = _model(axial_pos_embds=False).eval()
    with pytest.raises(ValueError, match=r"position_ids \(config.max_position_embeddings\) must be in \[0, 64\)"):
        no_axial(_ids(seq_len=16), position_ids=torch.arange(16) + 60)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(_ids(seq_len=16), position_ids=torch.arange(15))


def test_attention_mask_shape():
    model = _model().eval()
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 32\)"):
        model(_ids(), attention_mask=torch.ones(2, 31))


def test_inputs_and_arguments():
    model = _model().eval()
    with pytest.raises(ValueError, match="both input_ids and inputs_embeds"):
        model(_ids(), inputs_embeds=torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.zeros(2, 32, 31))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(_ids().float())
    with pytest.raises(ValueError, match="num_hashes"):
        model(_ids(), num_hashes=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model(_ids(), token_type_ids=_ids())
    with pytest.raises(TypeError, match="past_buckets_states"):
        model(_ids(), past_buckets_states=[])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(_ids(), labels=_ids()[:, :5])


@pytest.mark.parametrize("class_name", ["ReformerModelWithLMHead", "ReformerForMaskedLM"])
def test_bad_labels_name_labels(class_name):
    model = _model(class_name, is_decoder=class_name == "ReformerModelWithLMHead").eval()
    ids = _ids()
    for labels in (ids.float(), ids.masked_fill(ids == ids[0, 0], 37), ids.masked_fill(ids == ids[0, 0], -5)):
        with pytest.raises(ValueError, match="labels"):
            model(ids, labels=labels)
    ignored = ids.masked_fill(ids == ids[0, 0], -100)
    assert torch.isfinite(model(ids, labels=ignored).loss)


def test_bad_class_labels_name_labels():
    model = _model("ReformerForSequenceClassification", is_decoder=False, num_labels=3).eval()
    with pytest.raises(ValueError, match="labels"):
        model(_ids(), labels=torch.tensor([0, 3]))


@pytest.mark.parametrize(
    "class_name, overrides, field",
    [
        ("ReformerModelWithLMHead", dict(is_decoder=True, lsh_num_chunks_after=1), "lsh_num_chunks_after"),
        ("ReformerModelWithLMHead", dict(is_decoder=True, local_num_chunks_after=2), "local_num_chunks_after"),
        ("ReformerModelWithLMHead", dict(is_decoder=False), "is_decoder"),
        ("ReformerForMaskedLM", dict(is_decoder=True), "is_decoder"),
        ("ReformerForQuestionAnswering", dict(num_labels=3), "num_labels"),
        ("ReformerModel", dict(axial_pos_embds_dim=[16, 20]), "axial_pos_embds_dim"),
        ("ReformerModel", dict(num_buckets=[4, 3]), "num_buckets"),
    ],
)
def test_contradictory_config(class_name, overrides, field):
    with pytest.raises(ValueError, match=field):
        _model(class_name, **overrides)


def test_lm_head_allows_look_ahead_only_for_unused_attention_type():
    model = _model(attn_layers=["lsh", "lsh"], local_num_chunks_after=1)
    assert isinstance(model, reformer.ReformerModelWithLMHead)


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def test_model_output_indexing():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        as_tuple = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert list(out.keys()) == ["loss", "logits", "hidden_states"]
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.logits
    assert len(out) == 3 and "attentions" not in out
    assert len(out[1:]) == 2
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], out.hidden_states))
    with pytest.raises(KeyError):
        out["attentions"]


@pytest.mark.parametrize(
    "class_name", ["ReformerForMaskedLM", "ReformerForQuestionAnswering", "ReformerForSequenceClassification"]
)
def test_return_dict_false_matches_transformers(class_name, tmp_path):
    config = tiny_config(attn_layers=["lsh", "local"])
    hf = hf_model(class_name, **config).eval()
    ours = load_ours(hf, tmp_path).eval()
    ids = _ids()
    labels = {
        "ReformerForMaskedLM": {"labels": ids},
        "ReformerForSequenceClassification": {"labels": torch.tensor([0, 1])},
    }.get(class_name, {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])})
    with torch.no_grad():
        expected = hf(ids, **labels, output_attentions=True, return_dict=False)
        actual = ours(ids, **labels, output_attentions=True, return_dict=False)
    assert len(actual) == len(expected)

    def flatten(items):
        for item in items:
            if isinstance(item, (tuple, list)):
                yield from flatten(item)
            else:
                yield item

    for got, want in zip(flatten(actual), flatten(expected), strict=True):
        assert max_abs(got, want) <= 1e-4


@pytest.mark.parametrize("offset", [None, 3], ids=["no-position-ids", "position-ids+3"])
def test_eval_padding_trims_and_continues_positions(offset):
    """Automatic eval padding = padding by hand with pad tokens, a zero mask and continued positions."""
    model = _model(axial_pos_shape=[8, 8], max_position_embeddings=64, attn_layers=["local", "lsh"]).eval()
    ids = _ids(seq_len=27)
    kwargs = {} if offset is None else {"position_ids": torch.arange(27) + offset}
    manual_ids = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], dim=1)
    manual_mask = torch.cat([torch.ones(2, 27), torch.zeros(2, 5)], dim=1)
    manual_kwargs = {} if offset is None else {"position_ids": torch.arange(32) + offset}
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, **kwargs)
        manual = model(manual_ids, attention_mask=manual_mask, output_hidden_states=True, **manual_kwargs)
    assert out.logits.shape == (2, 27, 37)
    assert torch.equal(out.logits, manual.logits[:, :27])
    # hidden states keep the padded length (as transformers returns them); the pad positions' own
    # states show which position ids they were given
    assert out.hidden_states[0].shape == (2, 32, 32)
    for got, want in zip(out.hidden_states, manual.hidden_states, strict=True):
        assert torch.equal(got, want)


def test_inputs_embeds_equals_input_ids():
    model = _model().eval()
    ids = _ids(seq_len=27)
    with torch.no_grad():
        from_ids = model(ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.allclose(from_ids, from_embeds, atol=1e-6)


def test_logits_to_keep():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    # one row instead of 64 through the LM-head matmul: BLAS may round differently
    assert last.shape == (2, 1, 37) and torch.allclose(last, full[:, -1:], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------------
def _manual_axial(module: AxialPositionEmbeddings, positions: torch.Tensor) -> torch.Tensor:
    """Position p → concat over axes of W_a[digit_a(p)], digits most significant first."""
    shape = module.axial_pos_shape
    rows = []
    for position in positions.tolist():
        digits, rest = [], position
        for size in reversed(shape):
            digits.append(rest % size)
            rest //= size
        digits.reverse()
        rows.append(torch.cat([table[d] for table, d in zip(module.tables(), digits)]))
    return torch.stack(rows)


def test_three_axis_axial_eval_and_train():
    """transformers' eval path unpacks exactly two axes; ours handles any number."""
    model = _model("ReformerModel", axial_pos_shape=[2, 4, 4], axial_pos_embds_dim=[8, 8, 16])
    axial = model.embeddings.position_embeddings
    with torch.no_grad():
        for weight in axial.weights:
            weight.normal_()
    axial.eval()
    positions = torch.tensor([[0, 5, 17, 31, 12], [3, 3, 30, 1, 0]])
    assert torch.equal(axial(positions), torch.stack([_manual_axial(axial, row) for row in positions]))
    model.eval()
    with torch.no_grad():
        assert model(_ids(seq_len=20)).last_hidden_state.shape == (2, 20, 64)
    model.train()
    model(_ids(seq_len=32)).last_hidden_state.sum().backward()
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in axial.weights)


@pytest.mark.filterwarnings("ignore:dropout2d")
@pytest.mark.parametrize("axial_pos_shape, dims", [([4, 8], [12, 20]), ([2, 4, 4], [8, 8, 16])], ids=["2axes", "3axes"])
def test_training_dropout_matches_transformers_embeddings(axial_pos_shape, dims, tmp_path):
    """Word-embedding dropout then the dropout2d pattern on the axial table, same RNG stream as transformers."""
    config = tiny_config(
        attn_layers=["local"], axial_pos_shape=axial_pos_shape, axial_pos_embds_dim=dims, hidden_dropout_prob=0.3
    )
    hf = hf_model("ReformerModel", **config)
    ours = load_ours(hf, tmp_path)
    hf.embeddings.train()
    ours.embeddings.train()
    ids = _ids(batch=3, seq_len=32)
    torch.manual_seed(21)
    expected = hf.embeddings(input_ids=ids)
    torch.manual_seed(21)
    actual = ours.embeddings(input_ids=ids)
    assert torch.equal(actual, expected)
    # the axial part is dropped in whole slices: per batch row, positions sharing their axis-1 index
    ours.embeddings.position_embeddings.eval()
    clean = ours.embeddings.position_embeddings(torch.arange(32).expand(3, 32))
    ours.embeddings.position_embeddings.train()
    torch.manual_seed(22)
    dropped = ours.embeddings.position_embeddings(torch.arange(32).expand(3, 32))
    zero_rows = (dropped == 0).all(-1)  # [B, L]
    assert zero_rows.any() and not zero_rows.all()
    stride = math.prod(axial_pos_shape[2:])
    axis1 = (torch.arange(32) // stride) % axial_pos_shape[1]
    for row in range(3):
        for index in range(axial_pos_shape[1]):
            assert zero_rows[row, axis1 == index].unique().numel() == 1
    kept = ~zero_rows
    assert torch.allclose(dropped[kept], clean[kept] / 0.7)


def test_position_embeddings_without_axial(tmp_path):
    model = _model("ReformerModel", axial_pos_embds=False)
    assert isinstance(model.embeddings, ReformerEmbeddings)
    assert "embeddings.position_embeddings.embedding.weight" in model.state_dict()


# --------------------------------------------------------------------------------------------------
# init, num_buckets rule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "class_name",
    [
        "ReformerModel",
        "ReformerModelWithLMHead",
        "ReformerForMaskedLM",
        "ReformerForSequenceClassification",
        "ReformerForQuestionAnswering",
    ],
)
def test_fresh_weights_equal_transformers_under_the_same_seed(class_name):
    import transformers

    config = tiny_config(
        hidden_size=64,
        axial_pos_embds_dim=[32, 32],
        initializer_range=0.05,
        axial_norm_std=0.5,
        attn_layers=["lsh", "local"],
        is_decoder=class_name == "ReformerModelWithLMHead",
    )
    torch.manual_seed(3)
    ours = getattr(reformer, class_name)(reformer.ReformerConfig(**config)).state_dict()
    torch.manual_seed(3)
    theirs = getattr(transformers, class_name)(transformers.ReformerConfig(**config)).state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_fresh_weights_follow_transformers_init():
    model = _model(
        "ReformerModelWithLMHead",
        hidden_size=64,
        axial_pos_embds_dim=[32, 32],
        feed_forward_size=128,
        initializer_range=0.05,
        axial_norm_std=0.5,
        attn_layers=["lsh", "local"],
    )
    params = dict(model.named_parameters())
    for name, param in params.items():
        if "layer_norm" in name:
            assert torch.equal(param, torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)), (
                name
            )
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif "position_embeddings" in name:
            assert abs(param.std().item() - 0.5) < 0.1, name
        else:
            assert abs(param.std().item() - 0.05) < 0.01 and abs(param.mean().item()) < 0.01, name


@pytest.mark.parametrize("seq_len, chunk, max_pos", [(64, 8, 64), (1024, 16, 1024), (4096, 8, 4096), (4096, 4, 16384)])
def test_num_buckets_rule_matches_transformers(seq_len, chunk, max_pos):
    import transformers
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as TheirLSH

    from reformer.modeling_reformer import LSHSelfAttention

    kwargs = tiny_config(lsh_attn_chunk_length=chunk, max_position_embeddings=max_pos)
    theirs = TheirLSH(transformers.ReformerConfig(**kwargs))
    ours = LSHSelfAttention(reformer.ReformerConfig(**kwargs))
    theirs._set_num_buckets(seq_len)
    ours._set_num_buckets(seq_len)
    assert ours.config.num_buckets == theirs.num_buckets


@pytest.mark.parametrize("attn", ["local", "lsh"])
def test_layer_dropout_matches_transformers(attn, tmp_path):
    """Dropout placement inside a layer (attention probs, attention output, FF dense → dropout → act →
    dense → dropout, chunked FF) equals transformers' for the same RNG stream. ``output_attentions=True``
    runs the attention op's reference path, whose probability dropout is ``F.dropout`` like transformers'
    (the fast paths draw their own Philox masks)."""
    config = tiny_config(
        attn_layers=[attn],
        hash_seed=None,
        num_hashes=2,
        chunk_size_feed_forward=8,
        # gelu: relu commutes with dropout and would hide a wrong dense → act → dropout order
        hidden_act="gelu",
        hidden_dropout_prob=0.2,
        local_attention_probs_dropout_prob=0.3,
        lsh_attention_probs_dropout_prob=0.25,
    )
    hf = hf_model("ReformerModel", **config).train()
    ours = load_ours(hf, tmp_path).train()
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(3))
    results = []
    for layer in (hf.encoder.layers[0], ours.encoder.layers[0]):
        torch.manual_seed(5)
        attention = layer.attention(x, output_attentions=True)
        feed_forward = layer.feed_forward(x)
        results.append((attention.hidden_states, attention.attention_probs, feed_forward))
    for got, want in zip(results[1], results[0]):
        assert max_abs(got, want) <= 1e-6
    # dropout is active in all three
    for tensor in results[1]:
        assert (tensor == 0).any()


def test_classification_head_dropout_matches_transformers(tmp_path):
    hf = hf_model(
        "ReformerForSequenceClassification", **tiny_config(attn_layers=["local"], classifier_dropout=0.4)
    ).train()
    ours = load_ours(hf, tmp_path).train()
    x = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    expected = hf.classifier(x)
    torch.manual_seed(7)
    assert torch.equal(ours.classifier(x), expected)


@pytest.mark.parametrize(
    "class_name",
    [
        "ReformerModelWithLMHead",
        "ReformerForMaskedLM",
        "ReformerForSequenceClassification",
        "ReformerForQuestionAnswering",
    ],
)
@pytest.mark.parametrize("length", [32, 20])
def test_empty_batch_gives_empty_outputs(class_name, length):
    """B = 0 (e.g. the last shard of a distributed eval): empty outputs of the right shape, in eval and training (#13
    item 8; the torch path crashed with a reshape error)."""
    model = _model(class_name, is_decoder=class_name == "ReformerModelWithLMHead")
    ids = torch.zeros(0, length, dtype=torch.long)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        out = model(ids)
        tensors = [value for value in out.values() if isinstance(value, torch.Tensor)]
        assert tensors and all(t.shape[0] == 0 for t in tensors)
        if mode == "train":
            sum(t.sum() for t in tensors).backward()
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
