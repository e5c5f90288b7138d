"""The model classes in transformers' ecosystem: Trainer, accelerate, PEFT LoRA, hooks, hub loading, pipelines, beam
search. Each of these broke when the classes copied transformers' surface on plain modules (issue #12)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from model_testing import hf_model, load_ours, max_abs, tiny_config

import reformer

LENGTH = 32  # = prod(axial_pos_shape) of the tiny config: a trainable length


def _lm(seed: int = 0, **overrides) -> reformer.ReformerModelWithLMHead:
    torch.manual_seed(seed)
    config = reformer.ReformerConfig(**tiny_config(is_decoder=True, attn_layers=["local", "lsh"], **overrides))
    return reformer.ReformerModelWithLMHead(config)


def _ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 37, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# training loops
# --------------------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_trainer_trains_saves_and_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _lm()
    # one repeated pattern: five steps must lower the loss
    data = _Rows(torch.arange(LENGTH).remainder(7).add(3).repeat(8, 1))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").exists()
    reloaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "saved")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded(ids).logits)


def test_accelerate_loop_trains_saves_and_reloads(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _lm(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(_Rows(torch.arange(LENGTH).remainder(5).add(3).repeat(8, 1)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses = []
    batches = iter(loader)
    for _ in range(5):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(tmp_path / "saved")
    reloaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "saved")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(unwrapped.eval()(ids).logits, reloaded(ids).logits)


# --------------------------------------------------------------------------------------------------
# PEFT and hooks: the fast paths never bypass a module
# --------------------------------------------------------------------------------------------------
# the attention projections (LSH query_key/value, local query/key/value), the attention output and the feed-forward
LORA_TARGETS = r".*\.(query_key|query|key|value|dense\.dense|output\.dense)$"
# 2 x 1024 rows: the blocked CPU paths' sizes (>= 1024 rows for oneDNN, > 2048-row blocks for the final LayerNorm)
BLOCKED = dict(axial_pos_shape=[32, 64], max_position_embeddings=2048)


@pytest.mark.parametrize("size", ["small", "blocked"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_peft_lora_changes_logits_and_gets_gradients(size, mode):
    from peft import LoraConfig, get_peft_model

    overrides = BLOCKED if size == "blocked" else {}
    length = 2048 if size == "blocked" else LENGTH
    base = _lm(**overrides)
    ids = _ids(batch=1 if size == "blocked" else 2, length=length)
    with torch.no_grad():
        before = base.eval()(ids).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    # every targeted projection of both layers is wrapped: q/k/v (local), query_key/value (LSH), outputs, FF
    assert len(lora_b) == 3 + 2 + 2 * 3
    with torch.no_grad():
        for param in lora_b:
            param.normal_(std=0.5)
    getattr(model, mode)()
    context = torch.no_grad() if mode == "eval" else torch.enable_grad()
    with context:
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3, "LoRA weights did not change the logits"
    if mode == "train":
        model(ids, labels=ids).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
        assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values()), [
            name for name, g in grads.items() if g is None or g.abs().max() == 0
        ]


@pytest.mark.parametrize("size", ["small", "blocked"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_hooks_fire_once_per_forward(size, mode):
    model = _lm(**(BLOCKED if size == "blocked" else {}))
    ids = _ids(batch=1, length=2048 if size == "blocked" else LENGTH)
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)):
            calls[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    getattr(model, mode)()
    if mode == "train":
        model(ids, labels=ids).loss.backward()  # the reversible backward recomputes without hooks counting twice?
    else:
        with torch.no_grad():
            model(ids)
    forward_only = {name: count for name, count in calls.items()}
    if mode == "eval":
        assert set(forward_only.values()) == {1}, {n: c for n, c in forward_only.items() if c != 1}
    else:
        # the reversible backward recomputes each layer once more (as transformers does): layers fire twice, the
        # embeddings, final LayerNorm and head once
        for name, count in forward_only.items():
            expected = 2 if ".layers." in name else 1
            assert count == expected, (name, count)


def test_cached_steps_call_hooked_modules_and_compute_the_same():
    """A decoding step runs the projections and feed-forward of plain modules without calling them
    (``projections.project_step``, ``ChunkReformerFeedForward._forward_inline``): the same operations, so the same
    bits as the modules called, which a forward hook forces; and the hooks then fire once per step."""
    model = _lm().eval()
    ids = _ids(batch=2, length=20)
    calls: dict[str, int] = {}

    def steps(hooked: bool) -> torch.Tensor:
        handles = []
        if hooked:
            for name, module in model.named_modules():
                if ".layers." in name and isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU)):
                    calls[name] = 0
                    hook = lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1)  # noqa: E731
                    handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token, logits = out.past_buckets_states, out.logits[:, -1:].argmax(-1), []
            for name in calls:
                calls[name] = 0
            for _ in range(5):
                out = model(token, past_buckets_states=cache, use_cache=True)
                cache, token = out.past_buckets_states, out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        for handle in handles:
            handle.remove()
        return torch.cat(logits, 1)

    plain, hooked = steps(False), steps(True)
    assert torch.equal(plain, hooked)
    assert calls and set(calls.values()) == {5}, calls


class _Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrized_modules_are_not_plain():
    """The fast paths read weights directly only from plain modules; a parametrized weight must be computed by the
    module (fast_path's own cheap test agrees with torch's ``is_parametrized``)."""
    from torch.nn.utils import parametrize

    from reformer.modules import fast_path

    layer = torch.nn.Linear(4, 4)
    assert fast_path.plain_modules(layer) and not fast_path._parametrized(layer)
    parametrize.register_parametrization(layer, "weight", _Doubled())
    assert fast_path._parametrized(layer) and not fast_path.plain_modules(layer)
    parametrize.remove_parametrizations(layer, "weight")
    assert fast_path.plain_modules(layer) and not fast_path._parametrized(layer)
    # a ModuleDict named parametrizations on the plain class itself: torch counts it, so must the fast path
    layer.parametrizations = torch.nn.ModuleDict({"weight": torch.nn.ModuleList([_Doubled()])})
    assert parametrize.is_parametrized(layer) and fast_path._parametrized(layer)
    assert not fast_path.plain_modules(layer)
    # inside the model: a decoding step computes the parametrized weight (here: as if doubled in place)
    model = _lm().eval()
    # a local layer's value (an LSH step masks its own token's value)
    projection = model.reformer.encoder.layers[0].attention.self_attention.value

    def step_logits(before_step, after_step):
        with torch.no_grad():
            cache = model(_ids(batch=1, length=LENGTH - 8), use_cache=True).past_buckets_states
            before_step()
            logits = model(_ids(batch=1)[:, -1:], past_buckets_states=cache, use_cache=True).logits  # position 24
        after_step()
        return logits

    plain = step_logits(lambda: None, lambda: None)
    parametrized = step_logits(
        lambda: parametrize.register_parametrization(projection, "weight", _Doubled()),
        lambda: parametrize.remove_parametrizations(projection, "weight", leave_parametrized=False),
    )
    doubled = step_logits(lambda: projection.weight.data.mul_(2), lambda: projection.weight.data.div_(2))
    assert not torch.equal(parametrized, plain) and torch.equal(parametrized, doubled)


def test_hook_on_the_base_model_sees_hidden_states():
    """The LM head fuses itself into the final LayerNorm only where nobody can observe the base model's output."""
    model = _lm().eval()
    seen = []
    model.reformer.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.shape))
    with torch.no_grad():
        logits = model(_ids()).logits
    assert seen == [(2, LENGTH, 64)] and logits.shape == (2, LENGTH, 37)


# --------------------------------------------------------------------------------------------------
# hub loading and saving through transformers' machinery
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp_path (no network); returns a function that publishes a directory."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def publish(source, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in os.listdir(source):
            (snapshot / name).write_bytes((source / name).read_bytes())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)

    return publish


def test_load_by_hub_id_from_the_offline_cache(tmp_path, offline_hub):
    model = _lm().eval()
    model.save_pretrained(tmp_path / "ckpt")
    offline_hub(tmp_path / "ckpt", "org/tiny-reformer")
    loaded = reformer.ReformerModelWithLMHead.from_pretrained("org/tiny-reformer")
    also = reformer.ReformerModelWithLMHead.from_pretrained("org/tiny-reformer", local_files_only=True, revision="main")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(also(ids).logits, model(ids).logits)


@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_requested_dtype_wins_over_the_stored_one(tmp_path, argument):
    model = _lm()
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "float32"
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "ckpt", **{argument: torch.bfloat16})
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_device_map_and_sharded_round_trip(tmp_path):
    model = _lm()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [name for name in files if name.startswith("model-") and name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    loaded = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "sharded", device_map="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_transformers_config_object_is_accepted():
    import transformers

    config = transformers.ReformerConfig(**tiny_config(is_decoder=True, attn_layers=["local", "lsh"]))
    model = reformer.ReformerModelWithLMHead(config)
    assert isinstance(model.config, reformer.ReformerConfig) and model.config.hidden_size == 32


# --------------------------------------------------------------------------------------------------
# generation through GenerationMixin
# --------------------------------------------------------------------------------------------------
def test_pipeline_text_generation(tmp_path):
    from transformers import pipeline

    tokenizer = reformer.ReformerByteTokenizer()
    torch.manual_seed(0)
    config = reformer.ReformerConfig(
        **tiny_config(vocab_size=258, is_decoder=True, attn_layers=["local", "lsh"], eos_token_id=1)
    )
    model = reformer.ReformerModelWithLMHead(config).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("Call me", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("Call me")
    ids = model.generate(torch.tensor([tokenizer("Call me")["input_ids"]]), max_new_tokens=5)
    assert out[0]["generated_text"] == tokenizer.decode(ids[0], skip_special_tokens=True)


@pytest.mark.parametrize("num_hashes", [1, 2])
def test_beam_search_equals_transformers(tmp_path, num_hashes):
    kwargs = tiny_config(is_decoder=True, attn_layers=["local", "lsh"], num_hashes=num_hashes)
    hf = hf_model("ReformerModelWithLMHead", seed=4, **kwargs).eval()
    ours = load_ours(hf, tmp_path).eval()
    prompt = _ids(batch=1, length=12, seed=9)
    options = dict(max_new_tokens=10, num_beams=2, do_sample=False, early_stopping=True, eos_token_id=None)
    expected = hf.generate(prompt, **options)
    actual = ours.generate(prompt, **options)
    assert torch.equal(actual, expected)


def test_generate_options_and_dict_output(tmp_path):
    from transformers import GenerationConfig, TextIteratorStreamer  # noqa: F401  (streamers are transformers')
    from transformers.generation.streamers import BaseStreamer

    model = _lm().eval()
    prompt = _ids(batch=1, length=6, seed=3)
    received = []

    class Collect(BaseStreamer):
        def put(self, value):
            received.append(value.flatten().tolist())

        def end(self):
            received.append("end")

    out = model.generate(
        prompt,
        generation_config=GenerationConfig(max_length=14, do_sample=False, eos_token_id=None),
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        streamer=Collect(),
    )
    assert out.sequences.shape == (1, 14) and len(out.scores) == 8
    assert received[-1] == "end" and sum(len(r) for r in received[1:-1]) == 8
    # repetition_penalty really applies: without it the greedy continuation differs or the scores do
    plain = model.generate(prompt, max_length=14, do_sample=False, eos_token_id=None, output_scores=True,
                           return_dict_in_generate=True)  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(out.scores, plain.scores))


def test_ours_and_transformers_greedy_equal_after_round_trip(tmp_path):
    kwargs = tiny_config(is_decoder=True, attn_layers=["lsh", "local"])
    hf = hf_model("ReformerModelWithLMHead", seed=5, **kwargs).eval()
    ours = load_ours(hf, tmp_path).eval()
    prompt = _ids(batch=1, length=20, seed=2)
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, eos_token_id=None), expected)
    with torch.no_grad():
        assert max_abs(ours(prompt).logits, hf(prompt, use_cache=False).logits) <= 1e-5
