"""Operator calls in one cached decoding step, this package against transformers (a count, not a timing).

A one-token step of the small model costs its operator calls more than its arithmetic: on CPU each call is a few
microseconds of dispatch and allocation (several times its micro-benchmark cost inside a full step, whose code
and data keep evicting each other), the products of a row with the weights take the rest. This script prefills a
prompt (``reformer-bench``'s generate set-up: same preset, weights and ids), takes warm-up steps, then counts the
calls of one step ``model(token, past_buckets_states=cache, use_cache=True)``:

- ``python_calls``: ATen calls made from Python (``torch.profiler`` events with no ATen operator around them);
- ``dispatched``: operators that reach the backend kernels (a ``TorchDispatchMode``: composite operators such as
  ``linear`` or ``logsumexp`` counted as the operators they run), with the most frequent listed.

Deterministic for a given code version, so it compares versions on any machine.

    python -m benchmarks.step_op_count --length 1024 --impls ours transformers
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from reformer.bench.harness import build_model, model_config


class _CountDispatched(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _under_aten(event) -> bool:
    """Whether a profiler event runs inside an ATen operator (other events, e.g. ``record_function`` ranges,
    do not count as parents)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_step(impl: str, preset: str, length: int, warmup: int, top: int) -> dict:
    config = model_config(preset, length, mode="generate", new_tokens=warmup + 4)
    model, description = build_model(impl, config, seed=0, dtype=torch.float32, device="cpu")
    model.eval()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config["vocab_size"], (1, length), generator=generator)
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
        cache, token = out.past_buckets_states, out.logits[:, -1:].argmax(-1)
        for _ in range(warmup):  # past the first step (ours builds its LSH index there)
            out = model(token, past_buckets_states=cache, use_cache=True)
            cache, token = out.past_buckets_states, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model(token, past_buckets_states=cache, use_cache=True)
        with _CountDispatched() as dispatched:
            model(token, past_buckets_states=cache, use_cache=True)
    python_calls = [e for e in profiler.events() if e.name.startswith("aten::") and not _under_aten(e)]
    return dict(
        impl=impl,
        description=description,
        preset=preset,
        length=length,
        python_calls=len(python_calls),
        dispatched=sum(dispatched.counts.values()),
        top_dispatched=dispatched.counts.most_common(top),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--length", type=int, default=1024, help="prompt length before the counted step")
    parser.add_argument("--warmup", type=int, default=3, help="steps taken before the counted one")
    parser.add_argument("--top", type=int, default=10, help="most frequent dispatched operators listed")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [count_step(impl, args.preset, args.length, args.warmup, args.top) for impl in args.impls]
    print("| implementation | prompt L | ATen calls from Python | dispatched operators | most frequent |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        frequent = ", ".join(f"{name} {count}" for name, count in row["top_dispatched"][:5])
        print(f"| {row['description']} | {row['length']} | {row['python_calls']} | {row['dispatched']} | {frequent} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
