"""What the benchmark suites and the ``reformer-bench`` CLI share.

* ``model_config(preset, seq_len, ...)``: a transformers-style config dict for one sequence length
  (axial grid and bucket count derived from the length exactly as transformers would set them).
* ``build_model(impl, config, seed)``: the same weights under three implementations:
  ``ours`` (this project's ``reformer`` model, loaded with transformers' state dict; a checkpoint
  mismatch raises rather than measuring something else), ``transformers``
  (the unmodified model) and ``dense`` (transformers' model with every attention layer replaced by
  causal ``F.scaled_dot_product_attention`` over the whole sequence).
* ``measure(...)``: wall time of eval forwards or train steps, and the step's peak memory
  (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset before the step).
"""

from __future__ import annotations

import copy
import gc
import math
import os
import resource
import statistics
import time
from typing import Any

import torch

from reformer_kernels.gpu_check import GPU_PEAKS, gpu_peak  # noqa: F401  (re-exported: the bench's peak table)

IMPLS = ("ours", "transformers", "dense")
MODES = ("eval", "train", "generate")

# The CPU target configuration of issue #6: hidden 256, 2 heads x 64, FF 512, six layers
# alternating local/LSH, chunk 64, causal.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        hidden_size=256,
        num_attention_heads=2,
        attention_head_size=64,
        feed_forward_size=512,
        attn_layers=["local", "lsh"] * 3,
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        num_hashes=1,
        vocab_size=320,
        hash_seed=0,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        axial_pos_embds_dim=[64, 192],
    ),
    # enwik8's sizes with the small preset's alternating local/LSH pattern (the published
    # configuration is the "enwik8" preset below)
    "large": dict(
        hidden_size=1024,
        num_attention_heads=8,
        attention_head_size=128,
        feed_forward_size=4096,
        attn_layers=["local", "lsh"] * 6,
        local_attn_chunk_length=128,
        lsh_attn_chunk_length=256,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        num_hashes=4,
        vocab_size=258,
        hash_seed=0,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        axial_pos_embds_dim=[256, 768],
    ),
    # The two published Reformer checkpoints' configurations (their config.json on the Hugging Face
    # hub, google/reformer-crime-and-punishment and google/reformer-enwik8), field for field as
    # transcribed in PaddlePaddle/PaddleNLP paddlenlp/transformers/reformer/configuration.py
    # (REFORMER_PRETRAINED_INIT_CONFIGURATION); the crime-and-punishment values also match the
    # ReformerConfig of transformers' Reformer training notebook (patrickvonplaten). One change:
    # hash_seed 0 instead of None, so that the logits check against transformers hashes alike.
    # Dropout stays as published (training steps draw and apply the masks, as the real model does).
    # num_hidden_layers (6 / 12) is len(attn_layers) in transformers' config.
    "crime-and-punishment": dict(
        hidden_size=256,
        num_attention_heads=2,
        attention_head_size=64,
        feed_forward_size=512,
        attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"],
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        num_hashes=1,
        num_buckets=[64, 128],
        vocab_size=320,
        pad_token_id=0,
        hash_seed=0,
        hidden_act="relu",
        hidden_dropout_prob=0.05,
        local_attention_probs_dropout_prob=0.05,
        lsh_attention_probs_dropout_prob=0.0,
        max_position_embeddings=524288,
        axial_pos_embds=True,
        axial_pos_shape=[512, 1024],
        axial_pos_embds_dim=[64, 192],
        axial_norm_std=1.0,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        chunk_size_lm_head=0,
        chunk_size_feed_forward=0,
        tie_word_embeddings=False,
    ),
    "enwik8": dict(
        hidden_size=1024,
        num_attention_heads=8,
        attention_head_size=128,
        feed_forward_size=4096,
        attn_layers=[
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
        ],
        local_attn_chunk_length=128,
        lsh_attn_chunk_length=256,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        num_hashes=4,
        num_buckets=512,
        vocab_size=258,
        pad_token_id=0,
        hash_seed=0,
        hidden_act="relu",
        hidden_dropout_prob=0.2,
        local_attention_probs_dropout_prob=0.2,
        lsh_attention_probs_dropout_prob=0.1,
        max_position_embeddings=65536,
        axial_pos_embds=True,
        axial_pos_shape=[128, 512],
        axial_pos_embds_dim=[256, 768],
        axial_norm_std=1.0,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        chunk_size_lm_head=0,
        chunk_size_feed_forward=0,
        tie_word_embeddings=False,
    ),
    # seconds-long sizes for the test suite
    "tiny": dict(
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=48,
        attn_layers=["local", "lsh"],
        local_attn_chunk_length=8,
        lsh_attn_chunk_length=8,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        num_hashes=2,
        vocab_size=64,
        hash_seed=0,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        axial_pos_embds_dim=[8, 24],
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def axial_shape(seq_len: int) -> list[int]:
    """Two axial factors multiplying exactly to ``seq_len`` (training requires it), as square as possible."""
    small = max(d for d in range(1, math.isqrt(seq_len) + 1) if seq_len % d == 0)
    return [seq_len // small, small]


def default_num_buckets(seq_len: int, chunk_length: int, max_positions: int) -> int | list[int]:
    """transformers' ``LSHSelfAttention._set_num_buckets`` rule, applied up front."""
    pow2 = (2 * (seq_len // chunk_length)).bit_length() - 1
    limit = 2 * max(int((max_positions // chunk_length) ** 0.5), chunk_length)
    if 2**pow2 > limit:
        return [2 ** (pow2 // 2), 2 ** (pow2 - pow2 // 2)]
    return 2**pow2


def model_config(
    preset: str,
    seq_len: int,
    num_hashes: int | None = None,
    num_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
    mode: str = "eval",
    new_tokens: int = 0,
) -> dict[str, Any]:
    """A transformers ``ReformerConfig`` keyword dict for ``preset`` at ``seq_len``.

    Presets without an axial grid get one derived from ``seq_len`` (and ``max_position_embeddings``
    equal to it). The published presets keep theirs, except for ``mode="train"`` at another length
    than the grid's (transformers trains only at ``prod(axial_pos_shape)``): a derived grid then.

    ``mode="generate"``: ``seq_len`` is the prompt and ``new_tokens`` tokens follow it, so the grid must hold
    ``seq_len + new_tokens`` positions; a derived grid then covers the next power of two at or above that (eval
    embeds any length up to the grid's). The bucket count is derived from the prompt, as transformers' prefill
    would set it.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if not isinstance(new_tokens, int) or new_tokens < 0 or (new_tokens and mode != "generate"):
        raise ValueError(
            f"new_tokens must be a non-negative int, non-zero only with mode='generate'; got {new_tokens!r}"
        )
    positions = seq_len + new_tokens
    config = copy.deepcopy(PRESETS[preset])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        pattern = config["attn_layers"]
        config["attn_layers"] = [pattern[i % len(pattern)] for i in range(num_layers)]
    if num_hashes is not None:
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1; got {num_hashes}")
        config["num_hashes"] = num_hashes
    config.update(overrides or {})
    for name in ("local_attn_chunk_length", "lsh_attn_chunk_length"):
        if seq_len > config[name] and seq_len % config[name] != 0:
            raise ValueError(f"seq_len {seq_len} must be a multiple of {name}={config[name]}")
    fixed_grid = config.get("axial_pos_shape")
    if fixed_grid is not None and mode == "train" and math.prod(fixed_grid) != seq_len:
        if "axial_pos_shape" in (overrides or {}):
            raise ValueError(
                f"training needs prod(axial_pos_shape) == seq_len; got axial_pos_shape={list(fixed_grid)} at "
                f"seq_len {seq_len}"
            )
        # a published grid (e.g. crime-and-punishment's 512 x 1024) trains only at its full length;
        # shorter training runs get a derived grid with the same embedding widths
        config["axial_pos_shape"] = axial_shape(seq_len)
    elif fixed_grid is not None and math.prod(fixed_grid) < positions:
        what = f"seq_len {seq_len}" + (f" + {new_tokens} new tokens" if new_tokens else "")
        raise ValueError(
            f"{what} exceeds the {math.prod(fixed_grid)} positions of axial_pos_shape={list(fixed_grid)}; "
            "set a larger axial_pos_shape and max_position_embeddings (--set)"
        )
    if mode == "generate":
        config.setdefault("axial_pos_shape", axial_shape(1 << (positions - 1).bit_length()))
    config.setdefault("axial_pos_shape", axial_shape(seq_len))
    config.setdefault("max_position_embeddings", math.prod(config["axial_pos_shape"]))
    if config.get("num_buckets") is None:
        config["num_buckets"] = default_num_buckets(
            seq_len, config["lsh_attn_chunk_length"], config["max_position_embeddings"]
        )
    return config


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def _dense_attention(module, hidden_states, attention_mask=None, **kwargs):
    """Causal full attention over the whole sequence with the layer's own projections."""
    import torch.nn.functional as F

    from reformer_kernels.ops.chunked_attention import normalize_keys

    batch_size, seq_len, _ = hidden_states.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size

    def split(x):
        return x.view(batch_size, seq_len, heads, head_dim).transpose(1, 2)  # [B, H, L, D]

    if hasattr(module, "query_key"):
        query = split(module.query_key(hidden_states))
        # shared-QK keys, rescaled because SDPA applies 1/sqrt(D) itself
        key = normalize_keys(query) * math.sqrt(head_dim)
    else:
        query, key = split(module.query(hidden_states)), split(module.key(hidden_states))
    value = split(module.value(hidden_states))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=bool(module.is_decoder))  # [B, H, L, D]
    out = out.transpose(1, 2).reshape(batch_size, seq_len, heads * head_dim)
    output_type = "LSHSelfAttentionOutput" if hasattr(module, "query_key") else "LocalSelfAttentionOutput"
    from transformers.models.reformer import modeling_reformer as hf

    if output_type == "LSHSelfAttentionOutput":
        return hf.LSHSelfAttentionOutput(hidden_states=out, attention_probs=(), buckets=None)
    return hf.LocalSelfAttentionOutput(hidden_states=out, attention_probs=())


def build_model(
    impl: str, config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[torch.nn.Module, str]:
    """``(model, description)`` with weights drawn from ``seed`` identically for every ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "ours":
        import reformer

        if not transformers_available():
            torch.manual_seed(seed)
            model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**config))
            return model.to(device=device, dtype=dtype), "reformer (this project; transformers not installed)"
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf_model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**config))
    description = f"transformers {transformers.__version__}"
    model = hf_model
    if impl == "ours":
        model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**config))
        model.load_state_dict(hf_model.state_dict())  # the same weights; a mismatch raises
        description = "reformer (this project)"
    elif impl == "dense":
        import types

        from transformers.models.reformer import modeling_reformer as hf

        for module in model.modules():
            if isinstance(module, (hf.LSHSelfAttention, hf.LocalSelfAttention)):
                module.forward = types.MethodType(_dense_attention, module)
        description = "transformers, attention replaced by causal F.scaled_dot_product_attention"
    return model.to(device=device, dtype=dtype), description


def make_step(model: torch.nn.Module, mode: str, input_ids: torch.Tensor):
    """A zero-argument callable running one eval forward (``eval``) or train step (``train``: fwd + bwd)."""
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                return model(input_ids).logits

    elif mode == "train":
        model.train()

        def step():
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

    else:
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
    return step


def preset_step(impl: str, preset: str, seq_len: int, mode: str, seed: int = 0):
    """``(step, config)``: ``make_step`` of ``impl`` on ``preset`` at ``seq_len``, batch 1, fp32 on CPU, with
    ``run_case``'s weights (drawn from ``seed``) and input ids (from ``seed + 1``); for the profiling scripts under
    ``benchmarks/``."""
    config = model_config(preset, seq_len, mode=mode)
    model, _ = build_model(impl, config, seed=seed)
    input_ids = torch.randint(0, config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(seed + 1))
    return make_step(model, mode, input_ids), config


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def minor_page_faults() -> int:
    """The minor page faults this process has taken so far (``getrusage``'s ``ru_minflt``): each is a page of
    fresh memory (a new ``mmap``, or heap grown again after a trim) touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def tensor_peak_mb(step) -> float:
    """Peak of live tensor memory (MB) allocated by one call of ``step`` on CPU, above what was live before.

    The CPU counterpart of ``torch.cuda.max_memory_allocated``: the profiler's allocation events give
    the running total of tensor bytes; the allocator's retained or fragmented heap (which peak RSS
    includes) does not count here.
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return max([0, *totals]) / 2**20


def measure(step, device: str = "cpu", repeats: int = 3, warmup: int = 1, tensor_peak: bool = False) -> dict[str, Any]:
    """Time ``step`` (after ``warmup`` calls) and record the peak memory of the first call.

    Memory is measured around the first (warm-up) call, which allocates everything a step needs:
    ``peak_mb`` is the peak above the memory in use just before it (activations and workspace;
    model and inputs excluded) and ``peak_total_mb`` the absolute peak (CPU: peak RSS of the process).
    """
    gc.collect()
    result: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        resettable = _reset_peak_rss()
        before = (_rss_kib("VmRSS") or 0) * 1024
        result["peak_rss_reset"] = resettable
    for index in range(max(1, warmup)):
        step()
        _synchronize(device)
        if index == 0:
            if device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = (_rss_kib("VmHWM") or 0) * 1024
            result["peak_total_mb"] = peak / 2**20
            result["peak_mb"] = max(0, peak - before) / 2**20
    times, cpu_times = [], []
    for _ in range(repeats):
        _synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # CPU time (all threads) is reported next to wall time: on a shared machine it is the steadier figure
    result.update(
        times=times,
        time_s=min(times),
        time_median_s=statistics.median(times),
        cpu_times=cpu_times,
        cpu_time_s=min(cpu_times),
    )
    if tensor_peak and not device.startswith("cuda"):
        result["tensor_peak_mb"] = tensor_peak_mb(step)
    return result


def run_case(
    impl: str,
    preset: str,
    seq_len: int,
    mode: str = "eval",
    batch_size: int = 1,
    num_hashes: int | None = None,
    num_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    parity: bool = False,
    tensor_peak: bool = False,
    threads: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Build one model and measure it: the unit of work of one benchmark subprocess.

    ``parity=True`` (for ``ours``) afterwards also runs transformers' model on the same weights and
    input and records the largest absolute difference of the eval logits. ``compile=True`` (for ``ours``
    only) wraps the model in ``torch.compile`` (inductor) and runs one step to compile it before the
    measurement: its time (compilation plus that first step) is ``compile_s``, outside the warm-up and the
    timed steps (and the memory peak).
    """
    if compile and impl != "ours":
        raise ValueError(f"compile applies to impl 'ours' only; got impl {impl!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    config = model_config(preset, seq_len, num_hashes=num_hashes, num_layers=num_layers, overrides=overrides, mode=mode)
    model, description = build_model(impl, config, seed=seed, dtype=DTYPES[dtype], device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator).to(device)
    step = make_step(torch.compile(model) if compile else model, mode, input_ids)
    compile_s = None
    if compile:
        start = time.perf_counter()
        step()
        _synchronize(device)
        compile_s = time.perf_counter() - start
        description += ", torch.compile"
    result = measure(step, device=device, repeats=repeats, warmup=warmup, tensor_peak=tensor_peak)
    if compile_s is not None:
        result["compile_s"] = compile_s
    result.update(
        impl=impl,
        description=description,
        seq_len=seq_len,
        batch_size=batch_size,
        mode=mode,
        dtype=dtype,
        device=device,
        num_hashes=config["num_hashes"],
        num_layers=len(config["attn_layers"]),
        axial_pos_shape=list(config["axial_pos_shape"]),
        num_buckets=config["num_buckets"],
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    result["tokens_per_s"] = batch_size * seq_len / result["time_s"]
    if impl == "ours" and not device.startswith("cuda"):
        from reformer_kernels import cpu_linear

        # which library ran the large fp32 products (cpu_linear: by CPU kind, or REFORMER_CPU_GEMM)
        result["gemm_library"] = {op: cpu_linear.gemm_library(op) for op in ("linear", "weight_grad")}
    if parity and impl == "ours":
        reference, _ = build_model("transformers", config, seed=seed, dtype=DTYPES[dtype], device=device)
        with torch.no_grad():
            ours_logits = model.eval()(input_ids).logits
            reference_logits = reference.eval()(input_ids).logits
        result["max_abs_diff_vs_transformers"] = (ours_logits.float() - reference_logits.float()).abs().max().item()
    return result


def device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if not value else int(value)


def attention_inputs(
    config: dict[str, Any], layer: str, seq_len: int, batch_size: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, Any]:
    """Random inputs of the attention op at one layer's shapes (LSH: hashed and sorted like the model)."""
    from reformer_kernels import bucket_sort, lsh_hash
    from reformer_kernels.ops.lsh_hash import bucket_factors, num_buckets_product

    generator = torch.Generator().manual_seed(seed)
    heads, head_dim = config["num_attention_heads"], config["attention_head_size"]

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    query, value = rand(batch_size, heads, seq_len, head_dim), rand(batch_size, heads, seq_len, head_dim)
    if layer == "local":
        chunk = config["local_attn_chunk_length"]
        window = (
            (chunk, config["local_num_chunks_before"], config["local_num_chunks_after"])
            if seq_len > chunk
            else (seq_len, 0, 0)
        )
        return dict(
            query=query,
            key=rand(batch_size, heads, seq_len, head_dim),
            value=value,
            sorted_idx=None,
            chunk_length=window[0],
            num_chunks_before=window[1],
            num_chunks_after=window[2],
            causal=config["is_decoder"],
        )
    chunk, rounds, buckets = config["lsh_attn_chunk_length"], config["num_hashes"], config["num_buckets"]
    rotations = rand(heads, head_dim, rounds, sum(bucket_factors(buckets)) // 2)
    hashed = lsh_hash(query, rotations, buckets)  # [B, H, R*L]
    sorted_idx, _ = bucket_sort(hashed, rounds * (num_buckets_product(buckets) + 1))
    return dict(
        query=query,
        key=None,
        value=value,
        sorted_idx=sorted_idx,
        chunk_length=chunk,
        num_chunks_before=config["lsh_num_chunks_before"],
        num_chunks_after=config["lsh_num_chunks_after"],
        causal=config["is_decoder"],
    )


def attention_cost(inputs: dict[str, Any]) -> tuple[float, float]:
    """``(flops, bytes)`` of one forward of the attention op.

    FLOPs: the two matmuls, ``4 * B*H*R*L * w * D`` with ``w`` keys per query. Bytes: the compulsory
    traffic of a kernel that reads Q, K, V once per hash round through the index and writes the
    fp32 per-round output and logsumexp (a lower bound; window re-reads hit cache).
    """
    query = inputs["query"]
    batch_size, heads, seq_len, head_dim = query.shape
    rows = seq_len if inputs["sorted_idx"] is None else inputs["sorted_idx"].shape[-1]
    window = inputs["chunk_length"] * (inputs["num_chunks_before"] + 1 + inputs["num_chunks_after"])
    flops = 4.0 * batch_size * heads * rows * window * head_dim
    element = query.element_size()
    index_bytes = 0 if inputs["sorted_idx"] is None else batch_size * heads * rows * 8
    bytes_moved = batch_size * heads * rows * (3 * head_dim * element + head_dim * 4 + 4) + index_bytes
    return flops, bytes_moved


def attention_throughput(
    preset: str,
    seq_len: int,
    batch_size: int = 1,
    num_hashes: int | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    mode: str = "eval",
    repeats: int = 5,
) -> list[dict[str, Any]]:
    """Achieved GB/s and FLOP/s of the attention op alone (per layer type), against the GPU's peak.

    On CUDA the op runs the Triton kernels (``auto`` backend) and is timed with CUDA events; on CPU
    it runs the PyTorch path and no peak is given.
    """
    from reformer_kernels import chunked_attention

    config = model_config(preset, seq_len, num_hashes=num_hashes, overrides=overrides)
    torch_dtype = DTYPES[dtype]
    peak_flops, peak_bytes = (
        gpu_peak(torch.cuda.get_device_name(), torch_dtype) if device.startswith("cuda") else (None, None)
    )
    report = []
    for layer in sorted(set(config["attn_layers"])):
        inputs = attention_inputs(config, layer, seq_len, batch_size, torch_dtype, device)
        flops, bytes_moved = attention_cost(inputs)
        passes = [("fwd", 1.0, 1.0)]
        if mode == "train":
            # backward recomputes the scores: 5 matmuls of the same size, reads dO and writes dQ/dK/dV
            passes.append(("fwd+bwd", 3.5, 3.0))
        for name, flop_factor, byte_factor in passes:
            tensors = {
                k: (
                    v.detach().requires_grad_(name != "fwd")
                    if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v
                )
                for k, v in inputs.items()
            }

            def run(tensors=tensors, name=name):
                out, _ = chunked_attention(**tensors)
                if name != "fwd":
                    out.sum().backward()

            run()
            times = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    begin = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - begin)
            best = min(times)
            entry = dict(
                layer=layer,
                pass_=name,
                time_s=best,
                gb_per_s=bytes_moved * byte_factor / best / 1e9,
                tflop_per_s=flops * flop_factor / best / 1e12,
            )
            entry["pass"] = entry.pop("pass_")
            if peak_flops:
                entry["flop_fraction"] = flops * flop_factor / best / peak_flops
                entry["bw_fraction"] = bytes_moved * byte_factor / best / peak_bytes
            report.append(entry)
    return report


# ==================================================================================================
# generation: prefill and cached one-token steps
# ==================================================================================================
def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` by linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1]; got {fraction}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def step_statistics(times: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, min and max of per-step times, and the spread
    ``(p90 - p10) / median`` (the relative width of the middle 80%)."""
    median = statistics.median(times)
    p10, p90 = percentile(times, 0.1), percentile(times, 0.9)
    return dict(
        median=median,
        p10=p10,
        p90=p90,
        min=min(times),
        max=max(times),
        spread=(p90 - p10) / median if median > 0 else 0.0,
    )


def greedy_steps(model: torch.nn.Module, cache: Any, token: torch.Tensor, steps: int, device: str = "cpu"):
    """``steps`` greedy one-token steps through the model's forward with its cache, as ``generate`` runs them:
    ``model(token, past_buckets_states=cache, use_cache=True)`` then the argmax of the logits.

    Returns ``(tokens [B, steps], wall times, CPU times, last logits [B, V], cache)``, the cache being the last
    step's ``past_buckets_states`` (both implementations update theirs in place, but the next call takes what the
    model returned); each time covers one model call and its argmax (synchronised on CUDA), nothing else.
    """
    tokens, times, cpu_times = [], [], []
    logits = None
    with torch.no_grad():
        for _ in range(steps):
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(token, past_buckets_states=cache, use_cache=True)
            logits = out.logits[:, -1]  # [B, V]
            token = logits.argmax(-1, keepdim=True)  # [B, 1]
            _synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            cache = out.past_buckets_states
            tokens.append(token)
    return torch.cat(tokens, dim=1), times, cpu_times, logits, cache


# steps a compiled model takes before a generate measurement: the first compiles the step's graph with the cache
# length as a constant, the second recompiles it with a dynamic length, which every later step reuses
COMPILE_WARMUP_STEPS = 3


def run_generate_case(
    impl: str,
    preset: str,
    seq_len: int,
    steps: int = 32,
    batch_size: int = 1,
    num_hashes: int | None = None,
    num_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Prefill a ``seq_len``-token prompt and take ``steps`` timed greedy cached steps (one model, one subprocess).

    Prefill: ``model(prompt, use_cache=True)``, timed as the best of ``repeats`` after one warm-up (peak memory
    measured around the first, as in ``measure``); the last prefill's cache is kept. Then one first step, timed
    alone (``first_step_s``: ours builds each LSH layer's bucket index there, an O(L) sort), and ``steps``
    timed steps (``greedy_steps``), whose statistics are reported (``step_*_s``), with the minor page faults the
    process took per timed step (``step_page_faults``: memory touched for the first time). The greedy tokens
    (the prefill's argmax, then one per step) and the logits of the prefill's last position and of the last step
    (row 0) come back for the comparison with the other implementation, made by the caller.

    ``compile=True`` (``ours`` only) wraps the model in ``torch.compile`` (inductor) and first runs a prefill and
    ``COMPILE_WARMUP_STEPS`` steps on a cache of their own: their time (the compilations of the prompt's graph
    and of the step's, which Dynamo makes dynamic in the cache length at the second step) is ``compile_s``,
    outside the measurement, whose prefill and steps then reuse those graphs.
    """
    if compile and impl != "ours":
        raise ValueError(f"compile applies to impl 'ours' only; got impl {impl!r}")
    if impl == "dense":
        raise ValueError("impl 'dense' has no cached decoding: generate measures 'ours' and 'transformers'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if threads is not None:
        torch.set_num_threads(threads)
    config = model_config(
        preset,
        seq_len,
        num_hashes=num_hashes,
        num_layers=num_layers,
        overrides=overrides,
        mode="generate",
        new_tokens=steps + 2,
    )
    model, description = build_model(impl, config, seed=seed, dtype=DTYPES[dtype], device=device)
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, config["vocab_size"], (batch_size, seq_len), generator=generator).to(device)
    compile_s = None
    if compile:
        model = torch.compile(model)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids, use_cache=True)
        greedy_steps(model, out.past_buckets_states, out.logits[:, -1:].argmax(-1), COMPILE_WARMUP_STEPS, device)
        del out
        compile_s = time.perf_counter() - start
        description += ", torch.compile"

    prefilled: dict[str, Any] = {}

    def prefill():
        prefilled.clear()  # the previous prefill's cache is freed before the next one allocates its own
        with torch.no_grad():
            prefilled["out"] = model(input_ids, use_cache=True)

    prefill_result = measure(prefill, device=device, repeats=repeats, warmup=1)
    out = prefilled.pop("out")
    cache = out.past_buckets_states
    prefill_logits = out.logits[:, -1]  # [B, V]
    first_token = prefill_logits.argmax(-1, keepdim=True)  # [B, 1]
    del out

    gc.collect()
    resettable = _reset_peak_rss() if not device.startswith("cuda") else False
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = (_rss_kib("VmRSS") or 0) * 1024
    first_tokens, first_times, _, _, cache = greedy_steps(model, cache, first_token, 1, device)
    faults_before = minor_page_faults()
    tokens, times, cpu_times, last_logits, _ = greedy_steps(model, cache, first_tokens[:, -1:], steps, device)
    step_page_faults = (minor_page_faults() - faults_before) / steps
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else (_rss_kib("VmHWM") or 0) * 1024

    stats = step_statistics(times)
    result: dict[str, Any] = dict(
        impl=impl,
        description=description,
        seq_len=seq_len,
        batch_size=batch_size,
        mode="generate",
        dtype=dtype,
        device=device,
        steps=steps,
        prefill_s=prefill_result["time_s"],
        prefill_times_s=prefill_result["times"],
        prefill_cpu_time_s=prefill_result["cpu_time_s"],
        peak_mb=prefill_result["peak_mb"],
        peak_total_mb=prefill_result["peak_total_mb"],
        step_peak_mb=max(0, peak - before) / 2**20,
        first_step_s=first_times[0],
        step_times_s=times,
        step_cpu_times_s=cpu_times,
        step_cpu_median_s=statistics.median(cpu_times),
        # host pages faulted in per timed step: a step that allocates with the context (fresh memory each step)
        # pays for them in its time; one that writes preallocated buffers takes ~none
        step_page_faults=step_page_faults,
        **{f"step_{key}_s" if key != "spread" else "step_spread": value for key, value in stats.items()},
        # greedy tokens of row 0..B-1: the prefill's argmax, the first step's, then the timed steps'
        greedy_tokens=torch.cat([first_token, first_tokens, tokens], dim=1).tolist(),
        prefill_last_logits=prefill_logits[0].float().tolist(),
        final_logits=last_logits[0].float().tolist(),
        num_hashes=config["num_hashes"],
        num_layers=len(config["attn_layers"]),
        axial_pos_shape=list(config["axial_pos_shape"]),
        num_buckets=config["num_buckets"],
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    if not device.startswith("cuda"):
        result["peak_rss_reset"] = prefill_result.get("peak_rss_reset", False) and resettable
    if compile_s is not None:
        result["compile_s"] = compile_s
    # the headline figures: a step's median time, and the tokens per second it gives
    result["time_s"] = result["step_median_s"]
    result["tokens_per_s"] = batch_size / result["step_median_s"]
    return result
