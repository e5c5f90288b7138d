"""Checkpoint IO: Hugging Face layout, both directions with transformers, strict keys, atomic saves."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from model_testing import hf_model, load_ours, max_abs, tiny_config

import reformer
from reformer.checkpoint import SAFE_WEIGHTS_NAME, WEIGHTS_NAME


def _our_model(class_name="ReformerModelWithLMHead", seed=0, **overrides):
    torch.manual_seed(seed)
    defaults = dict(is_decoder=class_name == "ReformerModelWithLMHead", attn_layers=["local", "lsh"])
    model = getattr(reformer, class_name)(reformer.ReformerConfig(**tiny_config(**{**defaults, **overrides})))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_(mean=1.0, std=0.5)
    return model.eval()


def _ids(batch=2, seq_len=32, vocab=37):
    return torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(5))


def _leftovers(parent) -> list[str]:
    return [name for name in os.listdir(parent) if name.startswith(".")]


def test_save_load_roundtrip(tmp_path):
    model = _our_model()
    with torch.no_grad():
        model.lm_head.decoder.bias.normal_()
        model.lm_head.bias.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", SAFE_WEIGHTS_NAME]
    assert _leftovers(tmp_path) == []
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (
        config["architectures"] == ["ReformerModelWithLMHead"]
        and config["model_type"] == "reformer"
        and config["dtype"] == "float32"
    )
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


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
def test_saved_here_loads_in_transformers(class_name, tmp_path):
    import transformers

    model = _our_model(class_name, num_hashes=2)
    model.save_pretrained(tmp_path / "ckpt")
    theirs = getattr(transformers, class_name).from_pretrained(tmp_path / "ckpt").eval()
    ids = _ids()
    with torch.no_grad():
        ours_out = model(ids)
        extra = (
            {"use_cache": False}
            if class_name in ("ReformerModel", "ReformerModelWithLMHead", "ReformerForSequenceClassification")
            else {}
        )
        their_out = theirs(ids, **extra)
    if class_name == "ReformerModel":
        pairs = [(ours_out.last_hidden_state, their_out.last_hidden_state)]
    elif class_name == "ReformerForQuestionAnswering":
        pairs = [(ours_out.start_logits, their_out.start_logits), (ours_out.end_logits, their_out.end_logits)]
    else:
        pairs = [(ours_out.logits, their_out.logits)]
    for got, want in pairs:
        assert max_abs(got, want) <= 1e-4


def test_lm_head_decoder_bias_is_added(tmp_path):
    """transformers 5.24 adds lm_head.decoder.bias and keeps lm_head.bias unused: so do we."""
    hf = hf_model("ReformerModelWithLMHead", **tiny_config(is_decoder=True, attn_layers=["lsh", "local"]))
    with torch.no_grad():
        hf.lm_head.decoder.bias.normal_()
        hf.lm_head.bias.normal_()
    ours = load_ours(hf, tmp_path).eval()
    assert torch.equal(ours.lm_head.decoder.bias, hf.lm_head.decoder.bias)
    assert torch.equal(ours.lm_head.bias, hf.lm_head.bias) and not ours.lm_head.bias.requires_grad
    ids = _ids()
    with torch.no_grad():
        expected = hf.eval()(ids, use_cache=False).logits
        actual = ours(ids).logits
        without_bias = expected - hf.lm_head.decoder.bias
    assert max_abs(actual, expected) <= 1e-5
    assert (actual - without_bias).abs().max() > 0.1  # the bias is not negligible here


def test_checkpoint_without_decoder_bias_adds_lm_head_bias(tmp_path):
    """Files without lm_head.decoder.bias (transformers 4.x keeping only the tied lm_head.bias; 5.0-5.23)
    have lm_head.bias added to the logits, as transformers 4.x and trax did."""
    hf = hf_model("ReformerModelWithLMHead", **tiny_config(is_decoder=True, attn_layers=["lsh", "local"]))
    with torch.no_grad():
        hf.lm_head.decoder.bias.normal_()
    hf.save_pretrained(tmp_path / "ckpt")
    bias = hf.lm_head.decoder.bias.detach().clone()

    def without_decoder_bias(state):
        state["lm_head.bias"] = state.pop("lm_head.decoder.bias")

    _rewrite_weights(tmp_path / "ckpt", without_decoder_bias)
    ours = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(ours.lm_head.decoder.bias, bias)
    ids = _ids()
    with torch.no_grad():
        assert max_abs(ours(ids).logits, hf.eval()(ids, use_cache=False).logits) <= 1e-5


def test_pytorch_model_bin_and_weights_only(tmp_path):
    model = _our_model()
    directory = tmp_path / "bin"
    # transformers 5 saves safetensors only; a .bin checkpoint as older transformers versions wrote it
    model.save_pretrained(directory)
    os.remove(directory / SAFE_WEIGHTS_NAME)
    torch.save(model.state_dict(), directory / WEIGHTS_NAME)
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    # a pickle that would run code on load is refused (torch.load(weights_only=True))
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(directory / WEIGHTS_NAME, "wb") as handle:
        pickle.dump({"x": Evil()}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        reformer.ReformerModelWithLMHead.from_pretrained(directory)


def test_safetensors_preferred_over_bin(tmp_path):
    model = _our_model()
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, tmp_path / "ckpt" / WEIGHTS_NAME)
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.decoder.weight, model.lm_head.decoder.weight)


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = _our_model()
    state = model.state_dict()
    keys = sorted(state)
    directory = tmp_path / "sharded"
    directory.mkdir()
    model.config.save_pretrained(directory)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for file_name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, directory / file_name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


def _rewrite_weights(directory, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(directory / SAFE_WEIGHTS_NAME)
    edit(state)
    save_file(state, directory / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})


def test_missing_and_unexpected_keys_raise(tmp_path):
    _our_model().save_pretrained(tmp_path / "ckpt")
    _rewrite_weights(tmp_path / "ckpt", lambda s: s.pop("reformer.encoder.layer_norm.bias"))
    with pytest.raises(ValueError, match=r"missing keys \['reformer.encoder.layer_norm.bias'\]"):
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")

    _our_model().save_pretrained(tmp_path / "ckpt2")
    _rewrite_weights(tmp_path / "ckpt2", lambda s: s.update({"reformer.encoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['reformer.encoder.extra.weight'\]"):
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt2")
    # non-strict: the extra key is ignored, the rest loads
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt2", strict=False)
    assert torch.equal(loaded.lm_head.decoder.weight, _our_model().lm_head.decoder.weight)


def test_shape_mismatch_raises(tmp_path):
    _our_model().save_pretrained(tmp_path / "ckpt")
    _rewrite_weights(tmp_path / "ckpt", lambda s: s.update({"lm_head.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match=r"lm_head.bias: checkpoint \(5,\) vs model \(37,\)"):
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")
    # asked for: the mismatched weight is freshly initialised, the rest loads
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt", ignore_mismatched_sizes=True)
    assert loaded.lm_head.bias.shape == (37,)


def test_base_and_headed_checkpoints_cross_load(tmp_path):
    """As in transformers: a base model loads from a headed checkpoint (head weights ignored) and a headed model from a
    base checkpoint (the new head initialised); the base model's own weights must all be there."""
    headed = _our_model("ReformerForMaskedLM", is_decoder=False)
    headed.save_pretrained(tmp_path / "mlm")
    base = reformer.ReformerModel.from_pretrained(tmp_path / "mlm")
    assert torch.equal(base.embeddings.word_embeddings.weight, headed.reformer.embeddings.word_embeddings.weight)

    base.save_pretrained(tmp_path / "base")
    classifier = reformer.ReformerForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=4)
    assert classifier.classifier.out_proj.out_features == 4
    assert torch.equal(classifier.reformer.encoder.layer_norm.weight, headed.reformer.encoder.layer_norm.weight)

    _rewrite_weights(tmp_path / "base", lambda s: s.pop("encoder.layer_norm.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['reformer.encoder.layer_norm.weight'\]"):
        reformer.ReformerForSequenceClassification.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer_norm.weight'\]"):
        reformer.ReformerModel.from_pretrained(tmp_path / "base")


def test_legacy_keys(tmp_path):
    """transformers 4.x stored lm_head.decoder.bias (tied to lm_head.bias), maybe alone, and persistent mask buffers."""
    model = _our_model()
    with torch.no_grad():
        model.lm_head.decoder.bias.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    bias = model.lm_head.decoder.bias.detach().clone()

    def legacy(state):
        del state["lm_head.bias"]
        state["reformer.encoder.layers.1.attention.self_attention.self_mask_value_float32"] = torch.tensor(-1e5)

    _rewrite_weights(tmp_path / "ckpt", legacy)
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.decoder.bias, bias) and torch.equal(loaded.lm_head.bias, bias)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_overrides_and_dtype(tmp_path):
    _our_model().save_pretrained(tmp_path / "ckpt")
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt", num_hashes=3, dtype=torch.float64)
    assert loaded.config.num_hashes == 3 and loaded.dtype == torch.float64
    with pytest.raises(TypeError, match="num_hashs"):
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt", num_hashs=3)
    loaded.save_pretrained(tmp_path / "f64")
    assert (
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "f64").dtype == torch.float64
    )  # dtype="auto" via config


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import transformers

    model = _our_model()
    save = transformers.PreTrainedModel.save_pretrained

    def failing_save(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)
        with open(os.path.join(directory, SAFE_WEIGHTS_NAME), "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    # a fresh target: no checkpoint file appears
    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() or os.listdir(tmp_path / "fresh") == []

    # an existing checkpoint: left exactly as it was
    model.save_pretrained(tmp_path / "existing")
    (tmp_path / "existing" / "tokenizer_config.json").write_text("{}")
    before = {name: (tmp_path / "existing" / name).read_bytes() for name in os.listdir(tmp_path / "existing")}
    other = _our_model(seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="disk full"):
            other.save_pretrained(tmp_path / "existing")
    after = {name: (tmp_path / "existing" / name).read_bytes() for name in os.listdir(tmp_path / "existing")}
    assert after == before
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "existing")
    assert torch.equal(loaded.lm_head.decoder.weight, model.lm_head.decoder.weight)


def test_save_over_existing_keeps_other_files_and_drops_stale_weights(tmp_path):
    directory = tmp_path / "ckpt"
    _our_model().save_pretrained(directory)
    os.rename(directory / SAFE_WEIGHTS_NAME, directory / WEIGHTS_NAME)
    (directory / "spiece.model").write_bytes(b"tokenizer")
    new = _our_model(seed=3)
    new.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["config.json", "generation_config.json", SAFE_WEIGHTS_NAME, "spiece.model"]
    assert (directory / "spiece.model").read_bytes() == b"tokenizer"
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(directory)
    assert torch.equal(loaded.lm_head.decoder.weight, new.lm_head.decoder.weight)


def test_missing_weights_file(tmp_path):
    _our_model().config.save_pretrained(tmp_path / "cfg_only")
    with pytest.raises(OSError, match="model.safetensors"):
        reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "cfg_only")
