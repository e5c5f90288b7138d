"""Helpers of the cached-decoding tests (tests/test_cache.py, tests/test_generation.py): transformers' own cached
decoding as the oracle, step by step and layer by layer.

``hf_and_ours`` builds transformers' ``ReformerModelWithLMHead`` (random non-trivial LayerNorm and position
parameters, so that which keys a step sees changes the outputs by O(0.1-1)), saves it with its ``save_pretrained``
and loads it with ours. ``decode`` runs either model over a prompt and then one cached step per given token, and
records at every step: the logits, each attention layer's output (forward hooks on the attention modules), the
cache's bucket ids as raw ids (round offset removed), the LSH window positions (ours: the positions the cache's
bucket index found; transformers': the positions its ``_get_relevant_hid_states_and_buckets`` gathers, wrapped on
the instance) and, after the last step, the cached projections (transformers': its cached layer-normed states through
its own projection modules). ``assert_same_decoding`` holds ours to the oracle; a row of a left-padded batch is held
to that row decoded alone.

transformers is an oracle for one row at a time only: its cached LSH step gathers the window's states with
``hidden_states.reshape(-1, hidden).index_select(0, positions + bucket_idx_batch_offset)`` where the batch offset
``sequence_length * batch_size * (arange(n) // n)`` is always 0, so every row attends to row 0's cached states
(``_get_relevant_hid_states_and_buckets``, transformers 5.24); and it does not decode left-padded rows as if alone.
So ``decode`` refuses a transformers batch, and each row of ours is compared with that row decoded alone.

``windows_by_sort`` is a second, independent reference for the window positions: the O(L) algorithm (a stable sort
of every cached bucket id), not the cache's per-bucket index.

Round offsets: transformers offsets round ``r`` by ``r * nb`` unless its prompt forward hashed a padded prompt (then
``r * (nb + 1)``, and its later steps keep that offset only while its heuristic ``max(cached id) > R * nb - 1``
holds: ``decode`` asserts it does, else the oracle itself is inconsistent); ours always by ``r * (nb + 1)``
(``reformer.generation``'s docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from model_testing import assert_oracle_unpatched

import reformer
from reformer.generation import prefill_left_padded

LOGITS_ATOL = 1e-4
OUT_ATOL = 1e-5


def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` in units of ``max(1, max |expected|)``. Attention outputs here reach |8| (large
    weights and LayerNorm scales), where fp32 numbers are ~1e-6 apart: the two sides compute the same sums in another
    order (cached projections, a fused kernel's online softmax), so their rounding scales with the output; for outputs
    within [-1, 1] this is the plain max-abs error."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual.double() - expected.double()).abs().max().item() / max(1.0, expected.abs().max().item())


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual.double() - expected.double()).abs().max().item()


def randomize_norms_and_positions(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                mean = 1.0 if name.endswith("weight") else 0.0
                param.copy_(mean + 0.5 * torch.randn(param.shape, generator=generator))
            elif "position_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def hf_and_ours(tmp_path, config: dict, seed: int = 0):
    """transformers' ``ReformerModelWithLMHead`` (the oracle) and ours loaded from its checkpoint, both in eval."""
    import transformers

    assert_oracle_unpatched()
    torch.manual_seed(seed)
    hf = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**config))
    randomize_norms_and_positions(hf, seed)
    hf.eval().save_pretrained(tmp_path / "checkpoint")
    ours = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path / "checkpoint").eval()
    return hf, ours


def random_ids(batch: int, length: int, seed: int, vocab_size: int = 37) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W], attention_mask [B, W])`` of 1-D prompts, left-padded to the longest."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1
    return ids, mask


def attention_layers(model) -> list[torch.nn.Module]:
    return [layer.attention.self_attention for layer in model.reformer.encoder.layers]


def is_lsh(attn) -> bool:
    return type(attn).__name__ == "LSHSelfAttention"


def num_buckets_product(attn) -> int | None:
    """The product of a layer's bucket factors (None while unset)."""
    if attn.num_buckets is None or isinstance(attn.num_buckets, int):
        return attn.num_buckets
    return math.prod(attn.num_buckets)


def windows_by_sort(
    raw_buckets: torch.Tensor, num_real: torch.Tensor, chunk_length: int, num_chunks_before: int, num_chunks_after: int
) -> torch.Tensor:
    """Window positions ``[B, H, R, T]`` of the last cached token (the new one) by a stable sort of all cached raw
    bucket ids ``[B, H, R, L + 1]`` (padding: the pad bucket ``nb``, after every real bucket); ``num_real [B]``: the
    real tokens of each row, the new one included. Transformers' algorithm: the chunk(s) of the sorted order around
    the new token's rank, wrapping around the row's real tokens."""
    length = raw_buckets.shape[-1] - 1
    sorted_positions = torch.sort(raw_buckets, dim=-1, stable=True).indices  # [B, H, R, L + 1]
    # the new token is the last of its bucket: its rank is the number of earlier tokens in buckets <= its own
    rank = (raw_buckets[..., :length] <= raw_buckets[..., length:]).sum(-1)  # [B, H, R]
    window = chunk_length * (1 + num_chunks_before + num_chunks_after)
    start = (torch.div(rank, chunk_length, rounding_mode="floor") - num_chunks_before) * chunk_length  # [B, H, R]
    ranks = torch.remainder(start.unsqueeze(-1) + torch.arange(window), num_real.view(-1, 1, 1, 1))  # [B, H, R, T]
    return sorted_positions.gather(-1, ranks)


@dataclass(repr=False)
class Decoding:
    """What ``decode`` recorded. Step ``t`` is the model call on the ``t``-th token of the continuation."""

    logits: list[torch.Tensor | None] = field(default_factory=list)  # [B, V]: after the prompt, then per step
    outputs: list[list[torch.Tensor]] = field(default_factory=list)  # per step, per layer: [B, 1, H * D]
    buckets: list[list[torch.Tensor | None]] = field(default_factory=list)  # per step, per layer: raw [B, H, R, L]
    windows: list[list[torch.Tensor | None]] = field(default_factory=list)  # per step, per layer: [B, H, R, T]
    projections: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer, [B, H, L, D]
    num_buckets: list[int | None] = field(default_factory=list)  # per layer, after the last step
    window_shape: list[tuple[int, int, int] | None] = field(default_factory=list)  # (chunk, before, after) of LSH
    cache: Any = None


def _is_transformers(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def _prompt_is_padded(config, prompt_len: int) -> bool:
    """Whether transformers' prompt forward pads ``prompt_len`` to a multiple of the chunk lengths."""
    from transformers.models.reformer import modeling_reformer as theirs

    return (
        prompt_len > theirs._get_min_chunk_len(config)
        and prompt_len % theirs._get_least_common_mult_chunk_len(config) != 0
    )


def _raw(ids: torch.Tensor, stride: int) -> torch.Tensor:
    offsets = torch.arange(ids.shape[2], device=ids.device).view(1, 1, -1, 1) * stride  # [1, 1, R, 1]
    return ids.long() - offsets


def decode(
    model,
    prompt: torch.Tensor,
    continuation: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    num_hashes: int | None = None,
    cache=None,
    step_wrapper: Callable[[Callable[[], Any], int], Any] | None = None,
    after_step: Callable[[int, Any], None] | None = None,
    reorders: dict[int, torch.Tensor] | None = None,
) -> Decoding:
    """The prompt ``[B, P]`` with ``use_cache=True``, then one cached step per column of ``continuation [B, S]``
    (teacher-forced), through the model's forward, as a user (or ``generate``) calls it.

    ``mask [B, P]``: a left-padded batch (ours only), prefilled as ``generate`` does (``prefill_left_padded``) and
    stepped with the mask over the past and the new token. ``cache``: an empty ``ReformerDynamicCache`` to prefill
    (e.g. a static one), or a prefilled one (the prompt is then not run; ``logits[0]`` is None).
    ``step_wrapper(call, t)`` runs step ``t``'s model call (guards, backends, FLOP counters); ``after_step(t, cache)``
    runs after the prefill (``t = -1``) and after each step. ``reorders {t: rows}``: ``cache.reorder_cache(rows)``
    after step ``t`` (the mask and the continuation follow the rows).
    """
    theirs = _is_transformers(model)
    attns = attention_layers(model)
    padded = mask is not None and not bool(mask.bool().all())
    if theirs and prompt.shape[0] != 1:
        raise ValueError(
            "transformers' cached LSH steps read every row's window from row 0 (see the module docstring), and it "
            "does not decode left-padded rows as if alone: decode each row alone"
        )
    record = Decoding()
    outputs: list[torch.Tensor] = []
    windows: dict[int, torch.Tensor] = {}

    def output_hook(module, args, output):
        outputs.append(output[0].detach().clone())

    handles = [attn.register_forward_hook(output_hook) for attn in attns]
    wrapped = []
    if theirs:
        for layer_idx, attn in enumerate(attns):
            if not is_lsh(attn):
                continue

            def gather_windows(*args, _original=attn._get_relevant_hid_states_and_buckets, _idx=layer_idx, **kwargs):
                result = _original(*args, **kwargs)
                windows[_idx] = result[1].detach().clone()  # relevant_bucket_idx_chunk [B, H, R, T]
                return result

            attn._get_relevant_hid_states_and_buckets = gather_windows
            wrapped.append(attn)
    num_hashes_used = num_hashes if num_hashes is not None else model.config.num_hashes
    try:
        with torch.no_grad():
            if cache is not None and len(cache) > 0:
                record.logits.append(None)
            elif padded:
                if cache is not None:
                    raise ValueError("a left-padded prompt is prefilled by prefill_left_padded (no cache argument)")
                logits, cache = prefill_left_padded(model, prompt, mask.bool(), num_hashes)
                record.logits.append(logits)
            else:
                out = model(prompt, past_buckets_states=cache, use_cache=True, num_hashes=num_hashes)
                cache = out.past_buckets_states
                record.logits.append(out.logits[:, -1])
            # transformers' round offset per LSH layer (see the module docstring)
            strides = {}
            if theirs:
                padded_prompt = _prompt_is_padded(model.config, prompt.shape[1])
                for layer_idx, attn in enumerate(attns):
                    if is_lsh(attn):
                        hashed = cache.buckets_cache[layer_idx].numel() > 0
                        strides[layer_idx] = int(padded_prompt and hashed)  # + nb below
            if after_step is not None:
                after_step(-1, cache)
            step_mask = mask.long() if padded else None
            continuation = continuation.clone()
            for step in range(continuation.shape[1]):
                if step_mask is not None:
                    step_mask = torch.cat([step_mask, step_mask.new_ones(step_mask.shape[0], 1)], dim=1)
                if theirs:
                    _check_transformers_offsets(cache, attns, strides, num_hashes_used)
                else:
                    for layer in cache.layers:
                        layer.last_index = None  # a window the step does not compute must not pass as this step's
                outputs.clear()
                windows.clear()

                def call(token=continuation[:, step : step + 1], step_mask=step_mask, cache=cache):
                    return model(
                        token,
                        attention_mask=step_mask,
                        past_buckets_states=cache,
                        use_cache=True,
                        num_hashes=num_hashes,
                    )

                out = call() if step_wrapper is None else step_wrapper(call, step)
                cache = out.past_buckets_states
                assert len(outputs) == len(attns), f"step {step}: {len(outputs)} attention outputs recorded"
                record.logits.append(out.logits[:, -1])
                record.outputs.append(list(outputs))
                record.buckets.append(_raw_buckets(cache, attns, strides, theirs))
                record.windows.append([windows.get(i) if theirs else _our_window(cache, i) for i in range(len(attns))])
                if after_step is not None:
                    after_step(step, cache)
                if reorders is not None and step in reorders:
                    rows = reorders[step]
                    cache.reorder_cache(rows)
                    continuation = continuation[rows]
                    step_mask = step_mask[rows] if step_mask is not None else None
            record.projections = _projections(cache, attns, theirs)
    finally:
        for handle in handles:
            handle.remove()
        for attn in wrapped:
            del attn._get_relevant_hid_states_and_buckets
    record.num_buckets = [num_buckets_product(attn) if is_lsh(attn) else None for attn in attns]
    record.window_shape = [
        (attn.chunk_length, attn.num_chunks_before, attn.num_chunks_after) if is_lsh(attn) else None for attn in attns
    ]
    record.cache = cache
    return record


def _our_window(cache, layer_idx: int) -> torch.Tensor | None:
    index = cache.layers[layer_idx].last_index
    return None if index is None else index.long().clone()


def _check_transformers_offsets(cache, attns, strides: dict[int, int], num_hashes: int) -> None:
    for layer_idx, pad_offset in strides.items():
        buckets = cache.buckets_cache[layer_idx]
        if pad_offset and num_hashes > 1 and buckets.numel():
            num_buckets = num_buckets_product(attns[layer_idx])
            assert int(buckets.max()) > num_hashes * num_buckets - 1, (
                f"layer {layer_idx}: transformers' offset heuristic misfires on this prompt (its next query gets the "
                "offset nb while its cache uses nb + 1: see test_transformers_offset_heuristic_divergence); the oracle "
                "is inconsistent here, pick another seed"
            )


def _raw_buckets(cache, attns, strides: dict[int, int], theirs: bool) -> list[torch.Tensor | None]:
    raw = []
    for layer_idx, attn in enumerate(attns):
        buckets = cache.buckets_cache[layer_idx]
        if not is_lsh(attn) or buckets.numel() == 0:
            raw.append(None)
            continue
        num_buckets = num_buckets_product(attn)
        stride = num_buckets + (strides[layer_idx] if theirs else 1)
        ids = _raw(buckets, stride)  # [B, H, R, L]
        limit = num_buckets if theirs else num_buckets + 1  # ours: padding has the pad bucket nb
        assert int(ids.min()) >= 0 and int(ids.max()) < limit, f"layer {layer_idx}: ids outside their round"
        raw.append(ids)
    return raw


def _split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch_size, length, width = states.shape
    return states.view(batch_size, length, num_heads, width // num_heads).transpose(1, 2)  # [B, H, L, D]


def _projections(cache, attns, theirs: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the cached (key, value) projections ``[B, H, L, D]``: LSH query-key and value, local key and value;
    transformers caches the layer-normed states, projected here by its own modules."""
    if not theirs:
        return [tuple(t.clone() for t in cache.cached_projections(i)) for i in range(len(attns))]
    projections = []
    for layer_idx, attn in enumerate(attns):
        states = cache.states_cache[layer_idx]  # [B, L, hidden]
        key = attn.query_key(states) if is_lsh(attn) else attn.key(states)
        heads = attn.num_attention_heads
        projections.append((_split_heads(key, heads), _split_heads(attn.value(states), heads)))
    return projections


def assert_same_decoding(
    ours: Decoding,
    oracle: Decoding,
    row: int | Callable[[int], int] | None = None,
    pad: int = 0,
    steps: range | None = None,
    check_projections: bool = True,
) -> None:
    """``ours`` equals the oracle at every step (``steps``, default all) and layer: logits (<= LOGITS_ATOL),
    attention outputs (``error`` <= OUT_ATOL), raw bucket ids (exactly), the LSH window positions (exactly; and
    ours equal ``windows_by_sort`` of our cached buckets) and, after the last step, the cached projections.

    ``row``: ours is a batch whose row ``row`` (or ``row(step)``, after reorders) is the oracle's only row, with
    ``pad`` left-padding positions (bucket ids: the pad bucket there; projections: zeros); None: the same batch.
    """
    steps = range(len(oracle.outputs)) if steps is None else steps
    assert len(ours.outputs) >= steps.stop and len(oracle.outputs) >= steps.stop

    def rows_at(step: int):
        if row is None:
            return slice(None)
        index = row(step) if callable(row) else row
        return slice(index, index + 1)

    prompt_logits, expected = ours.logits[0], oracle.logits[0]
    if steps.start == 0 and prompt_logits is not None:
        assert max_abs(prompt_logits[rows_at(0)], expected) <= LOGITS_ATOL, "logits of the prompt"
    for step in steps:
        rows = rows_at(step)
        for layer_idx, expected in enumerate(oracle.outputs[step]):
            where = f"step {step} layer {layer_idx}"
            err = error(ours.outputs[step][layer_idx][rows], expected)
            assert err <= OUT_ATOL, f"{where}: attention output error {err:.3g}"
            expected_ids, actual_ids = oracle.buckets[step][layer_idx], ours.buckets[step][layer_idx]
            if expected_ids is not None:
                assert actual_ids is not None, f"{where}: transformers hashed, ours did not"
                actual_ids = actual_ids[rows]
                assert torch.equal(actual_ids[..., pad:], expected_ids), f"{where}: bucket ids"
                assert (actual_ids[..., :pad] == ours.num_buckets[layer_idx]).all(), f"{where}: padding bucket"
            elif pad == 0:
                # a longest row: the same transition step as transformers (the batch of a padded row may hash
                # earlier: its longest row reaches a chunk first)
                assert actual_ids is None, f"{where}: ours hashed before transformers"
            expected_window = oracle.windows[step][layer_idx]
            if expected_window is not None:
                actual_window = ours.windows[step][layer_idx]
                assert actual_window is not None, f"{where}: transformers attended through a window, ours did not"
                actual_window = actual_window[rows]
                assert torch.equal(actual_window - pad, expected_window), f"{where}: window positions"
                # the second reference: a stable sort of all our cached bucket ids (this row's real tokens)
                all_ids = ours.buckets[step][layer_idx][rows]
                num_real = torch.full((all_ids.shape[0],), all_ids.shape[-1] - pad)
                by_sort = windows_by_sort(all_ids, num_real, *ours.window_shape[layer_idx])
                assert torch.equal(actual_window, by_sort), f"{where}: window positions vs a sort over the cache"
        assert max_abs(ours.logits[step + 1][rows], oracle.logits[step + 1]) <= LOGITS_ATOL, f"logits after step {step}"
    if check_projections:
        rows = rows_at(steps.stop - 1)
        for layer_idx, (expected_pair, actual_pair) in enumerate(zip(oracle.projections, ours.projections)):
            for name, expected, actual in zip(("key", "value"), expected_pair, actual_pair):
                actual = actual[rows]
                err = error(actual[:, :, pad:], expected)
                assert err <= OUT_ATOL, f"layer {layer_idx}: cached {name} projections, error {err:.3g}"
                assert (actual[:, :, :pad] == 0).all(), f"layer {layer_idx}: cached {name} at padding"
