"""``reformer-bench``: our Reformer vs transformers' Reformer vs dense attention, over sequence length.

    reformer-bench                                   # default sweep on the device present
    reformer-bench --mode train --lengths 16384 65536
    reformer-bench --preset small --layers 12 --num-hashes 4 --set lsh_num_chunks_after=1
    reformer-bench --preset crime-and-punishment --lengths 524288 --impls ours transformers --rounds 2
    reformer-bench --isa avx2                         # AVX2 code paths (on a newer CPU: labelled so)
    reformer-bench --mode generate --impls ours transformers --lengths 1024 32768 65536 --threads 1

Every measurement (one implementation at one length) runs in a fresh subprocess, so its peak
memory is its own: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
on CPU the subprocess's peak RSS (``VmHWM``, reset before the step). Times are the best of
``--repeats`` steps after one warm-up step; speed-ups and memory ratios compare implementations
measured in the same run. ``--rounds N`` repeats the whole sweep N times, interleaved, and keeps each
measurement's fastest round and its largest peak memory: on a machine whose speed drifts from minute
to minute, every implementation then gets its best minute, not whichever minute it happened to run in.
Results go to ``<out>/reformer-bench_<device>_<mode>.json`` and a PNG plot of time and memory against
sequence length.

``--mode generate`` measures cached decoding after a prompt of each length (``ours`` and ``transformers``; dense
attention has no cache): the prefill (one forward of the prompt with ``use_cache=True``, best of ``--repeats``
after a warm-up), one first step timed alone (ours builds its LSH bucket index there), then ``--steps`` greedy
one-token steps ``model(token, past_buckets_states=cache, use_cache=True)``, each timed: median, 10th/90th
percentiles, min/max and the spread ``(p90 - p10) / median``. Both implementations' greedy tokens (the prefill's
argmax and one per step) are compared and the mismatches printed; at batch 1 transformers is a valid oracle (its
batched cached LSH step reads row 0's states, so at ``--batch-size`` > 1 no comparison is made). The plot shows
step and prefill time against the prompt length, log-log.

The header and the JSON name the CPU and the vector ISA its code runs (``reformer_kernels.cpu_info``:
hardware level from the CPU flags, torch's capability, oneDNN's ISA as it reports it). On CPU every
measurement subprocess runs under an address-space limit (``--memory-cap``, RLIMIT_AS): one that
runs out of memory is reported as ``out of memory (cap N GB)`` instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
# the logits check runs transformers' model a second time inside our measurement's subprocess: only
# at lengths where that costs seconds, not at L=524288
PARITY_MAX_LEN = 16384
LABELS = {"ours": "reformer-kernels", "transformers": "transformers", "dense": "dense SDPA"}


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    from .harness import DTYPES, IMPLS, MODES, PRESETS

    parser = argparse.ArgumentParser(
        prog="reformer-bench",
        description="Sweep sequence length: time, tokens/s and peak memory of this package's Reformer vs "
        "transformers' Reformer (same weights) vs dense attention.",
    )
    parser.add_argument(
        "--preset", default="small", choices=sorted(PRESETS), help="model configuration (default: small)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_parse_override,
        metavar="KEY=VALUE",
        help="override a config field (Python literal), e.g. --set num_buckets=[16,32]; repeatable",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="number of layers (repeats the preset's local/LSH pattern)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    parser.add_argument("--num-hashes", type=int, default=None, help="LSH hash rounds (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--mode",
        default="eval",
        choices=MODES,
        help="eval forward, train step (fwd+bwd), or generate (prefill + timed greedy cached steps)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=32,
        help="--mode generate: timed greedy one-token steps after the prompt (median and spread reported)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to compare")
    parser.add_argument(
        "--dense-max-len", type=int, default=4096, help="skip dense attention above this length (it is O(L^2) in time)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per measurement (default: torch's; 1 gives the steadiest "
        "ratios on a shared machine)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed steps per measurement (best is reported); --mode generate: timed prefills",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sweep this many times, interleaved; each measurement reports its fastest "
        "round and its largest peak memory (steadier ratios on a machine whose speed drifts)",
    )
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results"), help="output directory for JSON and PNG"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument(
        "--attention-throughput",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time the attention op alone and report GB/s and FLOP/s (auto: on CUDA only)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per measurement subprocess")
    parser.add_argument(
        "--memory-cap",
        type=float,
        default=None,
        metavar="GB",
        help="address-space limit (RLIMIT_AS, GiB) of each CPU measurement subprocess; a measurement that "
        "exceeds it is reported as 'out of memory (cap N GB)' instead of taking the machine down. "
        "Default on CPU: 85%% of physical memory (less if other processes leave less available), "
        "whole GB; 0: no limit",
    )
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="CPU code paths of the measurement subprocesses: 'avx2' sets ATEN_CPU_CAPABILITY, "
        "DNNL_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS so that torch, oneDNN and MKL run their AVX2 code "
        "(on a newer CPU: 'AVX2 code paths on an AVX-512 CPU', not another CPU)",
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "retain"),
        default="default",
        help="glibc malloc policy of the measurement subprocesses. 'retain' (MALLOC_MMAP_MAX_=0, "
        "large MALLOC_TRIM_THRESHOLD_) serves tensors > 32 MB from the reused heap instead of fresh "
        "mmaps that page-fault on every step; applies to every implementation alike",
    )
    parser.add_argument(
        "--no-tensor-peak",
        action="store_true",
        help="CPU: skip the extra profiled step that measures the peak of live tensor memory",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh subprocess per measurement (faster; "
        "peak memory is then not isolated between measurements)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="wrap our model (impl 'ours' only) in torch.compile before timing; the compilation (one step; in "
        "generate mode a prefill and three steps) is timed separately (compile_s) and excluded from the warm-up "
        "and the timed steps",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _validate(args: argparse.Namespace) -> None:
    if any(length < 1 for length in args.lengths):
        raise SystemExit(f"reformer-bench: --lengths must be positive; got {args.lengths}")
    if args.repeats < 1:
        raise SystemExit("reformer-bench: --repeats must be >= 1")
    if args.rounds < 1:
        raise SystemExit("reformer-bench: --rounds must be >= 1")
    if args.steps < 1:
        raise SystemExit("reformer-bench: --steps must be >= 1")
    if args.mode == "generate" and args.attention_throughput == "on":
        raise SystemExit("reformer-bench: --attention-throughput is for --mode eval / train")
    if args.batch_size < 1:
        raise SystemExit("reformer-bench: --batch-size must be >= 1")
    if args.num_hashes is not None and args.num_hashes < 1:
        raise SystemExit("reformer-bench: --num-hashes must be >= 1")
    if args.layers is not None and args.layers < 1:
        raise SystemExit("reformer-bench: --layers must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("reformer-bench: --threads must be >= 1")
    if args.memory_cap is not None and args.memory_cap < 0:
        raise SystemExit("reformer-bench: --memory-cap must be >= 0 (GB; 0: no limit)")
    if args.in_process and args.memory_cap:
        raise SystemExit("reformer-bench: --memory-cap needs subprocess measurements (drop --in-process)")
    if args.in_process and args.isa != "native":
        raise SystemExit("reformer-bench: --isa needs subprocess measurements (drop --in-process)")


def _worker(spec_json: str) -> int:
    """Subprocess entry: run one case, print its result as the last line of stdout."""
    print(json.dumps(run_spec(json.loads(spec_json))))
    return 0


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement (``harness.run_case`` plus optional attention throughput, or
    ``harness.run_generate_case``); errors are returned."""
    from .harness import attention_throughput, run_case, run_generate_case

    spec = dict(spec)
    throughput = spec.pop("attention_throughput", False)
    try:
        if spec["mode"] == "generate":
            spec.pop("mode")
            return classify_failure(run_generate_case(**spec), None)
        result = run_case(**spec)
        if throughput and spec["impl"] == "ours":
            result["attention"] = attention_throughput(
                spec["preset"],
                spec["seq_len"],
                batch_size=spec["batch_size"],
                num_hashes=spec.get("num_hashes"),
                overrides=spec.get("overrides"),
                dtype=spec["dtype"],
                device=spec["device"],
                mode=spec["mode"],
            )
    except Exception as error:  # reported to the parent, which prints it in the table
        result = {"impl": spec["impl"], "seq_len": spec["seq_len"], "error": f"{type(error).__name__}: {error}"}
    return classify_failure(result, None)


MALLOC_RETAIN = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
# how an allocation failure reads: torch's CPU allocator, Python, C++, CUDA
OUT_OF_MEMORY_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "memoryerror",
    "std::bad_alloc",
    "out of memory",
)


def default_memory_cap_gb() -> float | None:
    """The default address-space cap in whole GiB: 85% of physical memory, or less if other processes
    leave less available now (``MemAvailable`` minus 1 GiB), at least 1; ``None`` where unreadable."""
    fields = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in fields:
        return None
    cap = 0.85 * fields["MemTotal"]
    if "MemAvailable" in fields:
        cap = min(cap, fields["MemAvailable"] - 1.0)
    return float(max(1, int(cap)))


def _limit_address_space(cap_gb: float):
    """A ``preexec_fn`` setting RLIMIT_AS of the child to ``cap_gb`` GiB."""

    def apply():
        import resource

        limit = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def out_of_memory_error(cap_gb: float | None) -> str:
    return f"out of memory (cap {cap_gb:g} GB)" if cap_gb else "out of memory"


def classify_failure(result: dict[str, Any], cap_gb: float | None) -> dict[str, Any]:
    """``result`` with an allocation failure's error replaced by ``out of memory (cap N GB)``.

    The original message is kept as ``error_detail`` and ``out_of_memory`` is set, so tables and
    JSON say why a measurement is missing."""
    error = result.get("error")
    if error is None or not any(marker in error.lower() for marker in OUT_OF_MEMORY_MARKERS):
        return result
    detail = result.get("error_detail", error)  # classified once already (in the worker): keep its detail
    return dict(result, error=out_of_memory_error(cap_gb), error_detail=detail, out_of_memory=True)


def _run_subprocess(
    spec: dict[str, Any],
    timeout: float,
    malloc: str = "default",
    memory_cap_gb: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    command = [sys.executable, "-m", "reformer.bench.cli", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if malloc == "retain":
        env.update(MALLOC_RETAIN)
    env.update(extra_env or {})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    limit = _limit_address_space(memory_cap_gb) if memory_cap_gb else None
    failed = {"impl": spec["impl"], "seq_len": spec["seq_len"]}
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return dict(failed, error=f"timed out after {timeout:.0f} s")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        output = (completed.stderr or completed.stdout).strip()
        tail = " | ".join(output.splitlines()[-3:])
        if any(marker in output.lower() for marker in OUT_OF_MEMORY_MARKERS):
            error = f"exit {completed.returncode}: {tail}"
        elif completed.returncode == -9:  # SIGKILL: the kernel's OOM killer, most likely
            error = f"exit -9: killed by SIGKILL (the kernel's OOM killer?) {tail}".rstrip()
        else:
            error = f"exit {completed.returncode}: {tail}"
        return classify_failure(dict(failed, error=error), memory_cap_gb)
    return classify_failure(json.loads(lines[-1]), memory_cap_gb)


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per measurement from several rounds of the same sweep (same order in every round):
    the fastest successful round, with the largest peak memory of all successful rounds, every round's
    time (``round_times_s``) and the first round's logits check and attention throughput. A measurement
    that failed in every round keeps its first error.

    Generate rows (``time_s`` is the median step): the round with the fastest median step gives the step
    statistics; the prefill is the fastest round's (``prefill_s``, every round's in ``round_prefill_s``), every
    round's page faults per step go to ``round_step_page_faults`` and every round's step speed-up over transformers
    to ``round_step_speedups``, and the greedy-token comparison keeps its worst round (most mismatches, earliest
    first mismatch, largest logits difference)."""
    merged = []
    for attempts in zip(*rounds):
        ok = [r for r in attempts if "error" not in r]
        if not ok:
            merged.append(attempts[0])
            continue
        best = dict(min(ok, key=lambda r: r["time_s"]))
        best["round_times_s"] = [r["time_s"] for r in ok]
        for key in ("peak_mb", "peak_total_mb", "tensor_peak_mb", "step_peak_mb"):
            values = [r[key] for r in ok if key in r]
            if values:
                best[key] = max(values)
        for r in ok:  # measured in the first round only
            best.update((key, r[key]) for key in ("max_abs_diff_vs_transformers", "attention") if key in r)
        if all("prefill_s" in r for r in ok):
            best["round_prefill_s"] = [r["prefill_s"] for r in ok]
            best["prefill_s"] = min(best["round_prefill_s"])
        if all("step_page_faults" in r for r in ok):
            best["round_step_page_faults"] = [r["step_page_faults"] for r in ok]
        speedups = [r["step_speedup_vs_transformers"] for r in ok if "step_speedup_vs_transformers" in r]
        best.pop("step_speedup_vs_transformers", None)  # one round's ratio: the merged rows give the ratio
        if speedups:
            best["round_step_speedups"] = speedups
        checks = [r for r in ok if "greedy_mismatches" in r]
        if checks:
            best["greedy_mismatches"] = max(r["greedy_mismatches"] for r in checks)
            firsts = [r["first_mismatch"] for r in checks if r["first_mismatch"] is not None]
            best["first_mismatch"] = min(firsts) if firsts else None
            diffs = [r["max_abs_logits_diff_vs_transformers"] for r in checks]
            best["max_abs_logits_diff_vs_transformers"] = max(diffs)
        merged.append(best)
    return merged


def compare_generation(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Our greedy tokens against transformers' (same prompt, same weights): the number of token positions
    compared (all rows), how many differ, the first differing position (``None`` if none) and the largest
    difference of the logits at the prefill's last position and at the last step (row 0)."""
    ours_tokens, their_tokens = ours["greedy_tokens"], theirs["greedy_tokens"]
    if len(ours_tokens) != len(their_tokens) or any(len(a) != len(b) for a, b in zip(ours_tokens, their_tokens)):
        raise ValueError("greedy_tokens of the two implementations differ in shape: not the same measurement")
    differing = [
        position for a, b in zip(ours_tokens, their_tokens) for position, (x, y) in enumerate(zip(a, b)) if x != y
    ]
    logits_diff = max(
        max((abs(x - y) for x, y in zip(ours[key], theirs[key])), default=0.0)
        for key in ("prefill_last_logits", "final_logits")
    )
    return dict(
        greedy_tokens_compared=sum(len(row) for row in ours_tokens),
        greedy_mismatches=len(differing),
        first_mismatch=min(differing) if differing else None,
        max_abs_logits_diff_vs_transformers=logits_diff,
    )


GENERATION_BULK = ("prefill_last_logits", "final_logits")


def annotate_generate_round(results: list[dict[str, Any]], batch_size: int) -> None:
    """In one round's generate rows: our step speed-up over transformers at each prompt length (this round's
    medians), the greedy-token comparison (batch 1 only), and the bulky logits dropped once compared."""
    theirs = {r["seq_len"]: r for r in results if r["impl"] == "transformers" and "error" not in r}
    for r in results:
        if r["impl"] != "ours" or "error" in r or r["seq_len"] not in theirs:
            continue
        base = theirs[r["seq_len"]]
        r["step_speedup_vs_transformers"] = base["step_median_s"] / r["step_median_s"]
        if batch_size == 1:
            r.update(compare_generation(r, base))
    for r in results:
        for key in GENERATION_BULK:
            r.pop(key, None)


def greedy_cell(r: dict[str, Any], batch_size: int) -> str:
    if r["impl"] == "transformers":
        return "(reference)"
    if "greedy_mismatches" not in r:
        return "not compared (batch > 1)" if batch_size > 1 else "-"
    compared, mismatches = r["greedy_tokens_compared"], r["greedy_mismatches"]
    if mismatches == 0:
        return f"{compared}/{compared} equal"
    return f"MISMATCH: {mismatches}/{compared} differ, first at token {r['first_mismatch']}"


def format_generate_table(results: list[dict[str, Any]], memory_label: str, batch_size: int = 1) -> str:
    """Markdown table of generate rows: prefill, first step, step statistics, page faults per step, memory, ratios
    vs transformers at the same prompt length (and each round's step ratio), step time relative to the
    implementation's shortest prompt, and the greedy-token check."""
    header = (
        "| prompt L | implementation | prefill (s) | first step (ms) | step median (ms) | step p10-p90 (ms) | "
        f"spread | step CPU (ms) | page faults / step (rounds) | prefill {memory_label} | "
        "step speed-up vs transformers (rounds) | "
        "prefill speed-up | step vs shortest prompt | greedy tokens vs transformers |"
    )
    columns = 14
    lines = [header, "|---:|---|" + "---:|" * (columns - 3) + "---|"]
    baseline = {r["seq_len"]: r for r in results if r["impl"] == "transformers" and "error" not in r}
    shortest: dict[str, dict[str, Any]] = {}
    for r in results:
        if "error" not in r and (r["impl"] not in shortest or r["seq_len"] < shortest[r["impl"]]["seq_len"]):
            shortest[r["impl"]] = r
    for r in results:
        label = LABELS.get(r["impl"], r["impl"])
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {label} | {r['error']} |" + " |" * (columns - 3))
            continue
        base = baseline.get(r["seq_len"])
        step_speedup = base["step_median_s"] / r["step_median_s"] if base else None
        speedup_cell = _fmt(step_speedup, "{:.2f}x")
        if step_speedup is not None:
            speedup_cell += _every_round(r.get("round_step_speedups", []), "{:.2f}")
        first = shortest[r["impl"]]
        cells = [
            str(r["seq_len"]),
            label,
            f"{r['prefill_s']:.3f}",
            f"{r['first_step_s'] * 1e3:.2f}",
            f"{r['step_median_s'] * 1e3:.2f}",
            f"{r['step_p10_s'] * 1e3:.2f}-{r['step_p90_s'] * 1e3:.2f}",
            f"{r['step_spread']:.0%}",
            f"{r['step_cpu_median_s'] * 1e3:.2f}",
            _faults_cell(r),
            f"{r['peak_mb']:,.0f}",
            speedup_cell,
            _fmt(base["prefill_s"] / r["prefill_s"] if base else None, "{:.2f}x"),
            f"{r['step_median_s'] / first['step_median_s']:.2f} (vs {first['seq_len']})",
            greedy_cell(r, batch_size),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _every_round(values: list[float], pattern: str) -> str:
    """`` (a / b / c)``: every round's value after a table cell's figure, when there were several rounds."""
    return " (" + " / ".join(pattern.format(x) for x in values) + ")" if len(values) > 1 else ""


def _faults_cell(r: dict[str, Any]) -> str:
    """The fastest round's page faults per step, and every round's when there were several ("-" if not measured)."""
    if "step_page_faults" not in r:
        return "-"
    return f"{r['step_page_faults']:,.0f}" + _every_round(r.get("round_step_page_faults", []), "{:,.0f}")


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_table(results: list[dict[str, Any]], memory_label: str) -> str:
    """Markdown table: one row per (length, implementation), ratios vs transformers at the same length."""
    tensors = any("tensor_peak_mb" in r for r in results)
    header = "| L | implementation | time (s) | CPU time (s) | tokens/s | " + memory_label
    header += " | peak tensors (MB) |" if tensors else " |"
    header += " speed-up vs transformers | memory vs transformers |"
    header += " tensor memory vs transformers |" if tensors else ""
    columns = 10 if tensors else 8
    lines = [header, "|---:|---|" + "---:|" * (columns - 2)]
    baseline = {r["seq_len"]: r for r in results if r["impl"] == "transformers" and "error" not in r}

    def ratio(r, base, key):
        return r[key] / base[key] if base and key in r and base.get(key) else None

    for r in results:
        label = LABELS.get(r["impl"], r["impl"])
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {label} | {r['error']} |" + " |" * (columns - 3))
            continue
        base = baseline.get(r["seq_len"])
        speedup = base["time_s"] / r["time_s"] if base else None
        cells = [
            str(r["seq_len"]),
            label,
            f"{r['time_s']:.3f}",
            _fmt(r.get("cpu_time_s"), "{:.3f}"),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_mb']:,.0f}",
        ]
        if tensors:
            cells.append(_fmt(r.get("tensor_peak_mb"), "{:,.0f}"))
        cells += [_fmt(speedup, "{:.2f}x"), _fmt(ratio(r, base, "peak_mb"), "{:.2f}")]
        if tensors:
            cells.append(_fmt(ratio(r, base, "tensor_peak_mb"), "{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_attention_table(results: list[dict[str, Any]]) -> str:
    rows = [r for r in results if "attention" in r]
    if not rows:
        return ""
    lines = [
        "| L | attention op | time (ms) | GB/s | TFLOP/s | % peak BW | % peak FLOP/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for a in r["attention"]:
            lines.append(
                f"| {r['seq_len']} | {a['layer']} {a['pass']} | {a['time_s'] * 1e3:.2f} | {a['gb_per_s']:.1f} | "
                f"{a['tflop_per_s']:.2f} | {_fmt(a.get('bw_fraction'), '{:.0%}')} | "
                f"{_fmt(a.get('flop_fraction'), '{:.0%}')} |"
            )
    return "\n".join(lines)


def _finish_log_log(figure, axes, xlabel: str, title: str, path: str) -> None:
    """Log-log axes (base-2 lengths), labels, grid and legend for each ``(axis, ylabel)``; then save and close."""
    import matplotlib.pyplot as plt

    for axis, ylabel in axes:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(results: list[dict[str, Any]], path: str, title: str, memory_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in LABELS:
        rows = sorted((r for r in results if r["impl"] == impl and "error" not in r), key=lambda r: r["seq_len"])
        if not rows:
            continue
        lengths = [r["seq_len"] for r in rows]
        ax_time.plot(lengths, [r["time_s"] for r in rows], marker="o", label=LABELS[impl])
        (line,) = ax_mem.plot(lengths, [r["peak_mb"] for r in rows], marker="o", label=LABELS[impl])
        if all("tensor_peak_mb" in r for r in rows):
            ax_mem.plot(
                lengths,
                [max(r["tensor_peak_mb"], 1e-3) for r in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{LABELS[impl]} (live tensors)",
            )
    tensors = any("tensor_peak_mb" in r for r in results)
    mem_label = "peak memory above start (MB)" if tensors else memory_label
    _finish_log_log(figure, ((ax_time, "time per step (s)"), (ax_mem, mem_label)), "sequence length", title, path)


def plot_generate(results: list[dict[str, Any]], path: str, title: str) -> None:
    """Step time (median, p10-p90 bars) and prefill time against the prompt length, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_step, ax_prefill) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in LABELS:
        rows = sorted((r for r in results if r["impl"] == impl and "error" not in r), key=lambda r: r["seq_len"])
        if not rows:
            continue
        lengths = [r["seq_len"] for r in rows]
        medians = [r["step_median_s"] * 1e3 for r in rows]
        below = [max(0.0, m - r["step_p10_s"] * 1e3) for m, r in zip(medians, rows)]
        above = [max(0.0, r["step_p90_s"] * 1e3 - m) for m, r in zip(medians, rows)]
        ax_step.errorbar(lengths, medians, yerr=[below, above], marker="o", capsize=3, label=LABELS[impl])
        ax_prefill.plot(lengths, [r["prefill_s"] for r in rows], marker="o", label=LABELS[impl])
    axes = ((ax_step, "time per generated token (ms; median, p10-p90)"), (ax_prefill, "prefill of the prompt (s)"))
    _finish_log_log(figure, axes, "prompt length (tokens)", title, path)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    _validate(args)
    if args.malloc != "default" and args.in_process:
        raise SystemExit("reformer-bench: --malloc needs subprocess measurements (drop --in-process)")

    import torch

    from reformer_kernels import cpu_info

    from .harness import transformers_available

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("reformer-bench: --device cuda requested but CUDA is not available")
    impls = list(dict.fromkeys(args.impls))
    if not transformers_available():
        print(
            "reformer-bench: transformers is not installed: skipping the transformers and dense columns "
            "(pip install transformers to compare)"
        )
        impls = [impl for impl in impls if impl == "ours"]
        if not impls:
            raise SystemExit("reformer-bench: nothing to run")
    generate = args.mode == "generate"
    if generate and "dense" in impls:
        print("reformer-bench: dense attention has no cached decoding: not measured in --mode generate")
        impls = [impl for impl in impls if impl != "dense"]
        if not impls:
            raise SystemExit("reformer-bench: nothing to run")
    throughput = args.attention_throughput == "on" or (
        args.attention_throughput == "auto" and device.startswith("cuda")
    )
    overrides = dict(args.overrides)
    on_cuda = device.startswith("cuda")
    memory_label = "peak alloc (MB)" if on_cuda else "peak RSS above start (MB)"
    threads = args.threads or torch.get_num_threads()
    # the CPU as the measurement subprocesses see it (their ISA restriction included)
    isa_env = cpu_info.isa_environment(args.isa)
    cpu = cpu_info.cpu_info(environ={**os.environ, **isa_env})
    try:
        isa_label = cpu_info.isa_label(args.isa, cpu)
    except ValueError as error:
        raise SystemExit(f"reformer-bench: --isa {args.isa}: {error}") from None
    probe = None if on_cuda else cpu_info.probe_libraries({**os.environ, **isa_env})
    cpu_line = cpu_info.describe(cpu, probe)
    hardware = torch.cuda.get_device_name() if on_cuda else f"{cpu_line}, {threads} threads; {isa_label}"
    memory_cap = None
    if not on_cuda and not args.in_process:
        memory_cap = default_memory_cap_gb() if args.memory_cap is None else (args.memory_cap or None)
    print(
        f"reformer-bench: {args.mode} on {device} ({hardware}), preset {args.preset}, dtype {args.dtype}, "
        f"batch {args.batch_size}, lengths {args.lengths}"
        + (f", {args.steps} timed steps per prompt" if generate else "")
        + (f", memory cap {memory_cap:g} GB per measurement" if memory_cap else "")
    )
    if generate and args.batch_size > 1 and "transformers" in impls:
        print(
            "reformer-bench: batch > 1: greedy tokens are not compared (transformers' batched cached LSH step "
            "reads every row's window from row 0)"
        )

    load_before = _load_average()
    if load_before is not None and load_before > (os.cpu_count() or 1):
        print(
            f"reformer-bench: warning: load average {load_before:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU and timings will be noisy (CPU-time column and ratios are steadier)"
        )
    cases = [
        (length, impl)
        for length in args.lengths
        for impl in impls
        if not (impl == "dense" and length > args.dense_max_len)
    ]
    rounds: list[list[dict[str, Any]]] = []
    started = time.perf_counter()
    total = args.rounds * len(cases)
    for round_index in range(args.rounds):
        rounds.append([])
        for index, (length, impl) in enumerate(cases, 1):
            # the logits check and the tensor peak (an extra profiled step) need one round only
            spec = (
                dict(
                    impl=impl,
                    preset=args.preset,
                    seq_len=length,
                    mode="generate",
                    steps=args.steps,
                    batch_size=args.batch_size,
                    num_hashes=args.num_hashes,
                    num_layers=args.layers,
                    overrides=overrides,
                    dtype=args.dtype,
                    device=device,
                    repeats=args.repeats,
                    threads=args.threads,
                )
                if generate
                else dict(
                    impl=impl,
                    preset=args.preset,
                    seq_len=length,
                    mode=args.mode,
                    batch_size=args.batch_size,
                    num_hashes=args.num_hashes,
                    num_layers=args.layers,
                    overrides=overrides,
                    dtype=args.dtype,
                    device=device,
                    repeats=args.repeats,
                    attention_throughput=throughput and round_index == 0,
                    threads=args.threads,
                    parity=round_index == 0
                    and impl == "ours"
                    and "transformers" in impls
                    and length == min(args.lengths) <= PARITY_MAX_LEN,
                    tensor_peak=round_index == 0 and not args.no_tensor_peak and not device.startswith("cuda"),
                )
            )
            if args.compile and impl == "ours":
                spec["compile"] = True
            print(
                f"[{round_index * len(cases) + index}/{total}] {LABELS[impl]:<16} L={length:<6} ...",
                end=" ",
                flush=True,
            )
            result = (
                run_spec(spec)
                if args.in_process
                else _run_subprocess(spec, args.timeout, args.malloc, memory_cap, isa_env)
            )
            rounds[-1].append(result)
            compiled = f", compiled in {result['compile_s']:.1f} s (not timed)" if "compile_s" in result else ""
            if "error" in result:
                print(f"failed: {result['error']}", flush=True)
            elif generate:
                print(
                    f"prefill {result['prefill_s']:.3f} s, step {result['step_median_s'] * 1e3:.2f} ms "
                    f"(p10-p90 {result['step_p10_s'] * 1e3:.2f}-{result['step_p90_s'] * 1e3:.2f}), "
                    f"{result['peak_mb']:,.0f} MB  ({result['description']}{compiled})",
                    flush=True,
                )
            else:
                parity = result.get("max_abs_diff_vs_transformers")
                parity = "" if parity is None else f", max |logits - transformers'| = {parity:.1e}"
                print(
                    f"{result['time_s']:.3f} s, {result['peak_mb']:,.0f} MB  "
                    f"({result['description']}{parity}{compiled})",
                    flush=True,
                )
        if generate:
            annotate_generate_round(rounds[-1], args.batch_size)
    elapsed = time.perf_counter() - started
    results = merge_rounds(rounds)

    table = (
        format_generate_table(results, memory_label, args.batch_size)
        if generate
        else format_table(results, memory_label)
    )
    print()
    print(table)
    for r in results:
        if r.get("greedy_mismatches"):
            print(
                f"reformer-bench: WARNING: at L={r['seq_len']} our greedy tokens differ from transformers' in "
                f"{r['greedy_mismatches']} of {r['greedy_tokens_compared']} positions (first at token "
                f"{r['first_mismatch']}; max |logits difference| {r['max_abs_logits_diff_vs_transformers']:.1e})"
            )
    attention_table = format_attention_table(results)
    if attention_table:
        print()
        print(attention_table)
    rounds_note = f" ({args.rounds} rounds: each row its fastest round)" if args.rounds > 1 else ""
    print(f"\n{total} measurements in {elapsed:.0f} s{rounds_note}")

    os.makedirs(args.out, exist_ok=True)
    compiled = "_compiled" if args.compile else ""
    stem = os.path.join(args.out, f"reformer-bench_{device.split(':')[0]}_{args.mode}{compiled}")
    meta = dict(
        command="reformer-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device,
        hardware=hardware,
        cpu=cpu,
        cpu_probe=probe,
        isa=args.isa,
        isa_label=isa_label,
        memory_cap_gb=memory_cap,
        torch=torch.__version__,
        python=platform.python_version(),
        preset=args.preset,
        overrides=overrides,
        layers=args.layers,
        num_hashes=args.num_hashes,
        dtype=args.dtype,
        mode=args.mode,
        batch_size=args.batch_size,
        repeats=args.repeats,
        steps=args.steps if generate else None,
        rounds=args.rounds,
        threads=args.threads,
        memory=memory_label,
        elapsed_s=elapsed,
        load_average=[load_before, _load_average()],
        malloc=args.malloc,
        compile=args.compile,
    )
    with open(stem + ".json", "w") as handle:
        json.dump(
            dict(meta=meta, results=results, table=table, **({"rounds": rounds} if args.rounds > 1 else {})),
            handle,
            indent=2,
        )
    print(f"wrote {stem}.json")
    if not args.no_plot:
        where = hardware if on_cuda else f"{cpu['model_name']}, {threads} threads, {isa_label}"
        title = f"Reformer {args.preset} ({args.mode}, {args.dtype}, batch {args.batch_size}) on {where}"
        if generate:
            title = f"Reformer {args.preset} (greedy cached steps, {args.dtype}, batch {args.batch_size}) on {where}"
            plot_generate(results, stem + ".png", title)
        else:
            plot(results, stem + ".png", title, memory_label)
        print(f"wrote {stem}.png")
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
