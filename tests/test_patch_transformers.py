"""patch_transformers: a transformers Reformer gives the same outputs with our ops swapped in."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import reformer_kernels  # noqa: E402


def _tiny_config(**overrides):
    config = dict(
        vocab_size=53,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=48,
        attn_layers=["local", "lsh", "local", "lsh"],
        num_hashes=2,
        num_buckets=[2, 4],
        lsh_attn_chunk_length=8,
        local_attn_chunk_length=8,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        axial_pos_shape=[8, 8],
        axial_pos_embds_dim=[12, 20],
        max_position_embeddings=64,
        is_decoder=True,
        hash_seed=7,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    config.update(overrides)
    return transformers.ReformerConfig(**config)


def _model(**overrides):
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(_tiny_config(**overrides))
    with torch.no_grad():
        for weight in model.reformer.embeddings.position_embeddings.weights:
            weight.normal_()
    return model


@pytest.fixture(autouse=True)
def _restore_classes():
    yield
    reformer_kernels.unpatch_transformers()


def _logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("length", [64, 50, 8], ids=["L64", "L50-eval-padding", "L8-short"])
def test_patched_classes_keep_logits(length):
    model = _model().eval()
    input_ids = torch.randint(2, 53, (2, length))
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, : length // 4] = 0
    expected = _logits(model, input_ids, attention_mask)
    reformer_kernels.patch_transformers()
    assert (
        transformers.models.reformer.modeling_reformer.LSHSelfAttention.forward.__module__ == "reformer_kernels.patch"
    )
    got = _logits(model, input_ids, attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_patched_instance_keeps_train_gradients():
    torch.manual_seed(0)
    config = _tiny_config(is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=1)
    model = transformers.ReformerForMaskedLM(config)
    with torch.no_grad():
        for weight in model.reformer.embeddings.position_embeddings.weights:
            weight.normal_()
    model.train()
    input_ids = torch.randint(2, 53, (2, 64))

    def grads():
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    reformer_kernels.patch_transformers(model)
    # only this instance is patched, not the class
    assert (
        transformers.models.reformer.modeling_reformer.LSHSelfAttention.forward.__module__ != "reformer_kernels.patch"
    )
    got = grads()
    assert expected.keys() == got.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unpatch_restores_and_fallbacks_still_work():
    model = _model().eval()
    input_ids = torch.randint(2, 53, (1, 64))
    reformer_kernels.patch_transformers(model)
    with torch.no_grad():
        out = model(input_ids, output_attentions=True)  # falls back to transformers' own attention
    assert len(out.attentions) == 4
    reformer_kernels.unpatch_transformers(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patch_rejects_a_model_without_reformer_modules():
    with pytest.raises(ValueError, match="no transformers Reformer"):
        reformer_kernels.patch_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be"):
        reformer_kernels.patch_transformers("model")
