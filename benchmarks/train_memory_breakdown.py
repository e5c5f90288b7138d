"""Where a training step's tensor memory goes: the live tensors at the step's peak, and who allocated them.

One training step (``model(ids, labels=ids).loss.backward()``) of a ``reformer-bench`` preset runs under
``torch.profiler`` with memory profiling and Python stacks. Replaying the allocation events in time order gives
the running total of tensor bytes allocated during the step; at its maximum, every live allocation is listed with
its size, the op that allocated it and the innermost Python frames of this package. The allocator's retained heap
(which peak RSS includes) is not counted.

    python -m benchmarks.train_memory_breakdown --preset crime-and-punishment --length 65536 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import time

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from reformer.bench.harness import preset_step

_OWN = ("reformer/", "reformer_kernels/")


def _own_path(file_name: str) -> str | None:
    """The path from the package root (``reformer/...``, ``reformer_kernels/...``) of one of this package's files,
    else None. The profiler names files relative to their ``sys.path`` entry, or absolute."""
    if file_name.startswith(_OWN):
        return file_name
    index = max(file_name.rfind(f"/{own}") for own in _OWN)
    return file_name[index + 1 :] if index >= 0 else None


def _context(event) -> tuple[str, list[str]]:
    """The innermost ATen op enclosing an allocation event and this package's Python frames (innermost first),
    each as ``path:line function`` with the line of the call it was making (known from the next inner Python
    call's caller; the function's first line, marked ``(def)``, where it called an op directly)."""
    ops, frames = [], []
    call_line = None  # the line of the current frame at which the next inner Python call was made
    node = event.parent
    while node is not None:
        if node.tag == _EventType.TorchOp:
            ops.append(node.name)
        elif node.tag == _EventType.PyCCall:
            call_line = node.extra_fields.caller.line_number
        elif node.tag == _EventType.PyCall:
            site = node.extra_fields.callsite
            path = _own_path(site.file_name)
            if path is not None:
                line = f"{call_line}" if call_line is not None else f"{site.line_number}(def)"
                frames.append(f"{path}:{line} {site.function_name}")
            elif not frames and not ops:
                frames.append(node.name)
            call_line = node.extra_fields.caller.line_number
        node = node.parent
    # the outermost op (what the Python code called) and, when different, the innermost one (what allocated)
    op = "?" if not ops else ops[-1] if len(ops) == 1 else f"{ops[-1]}>{ops[0]}"
    return op, frames


def _walk(events):
    stack = list(events)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def breakdown(profiler, top: int) -> dict:
    allocations = [
        e
        for e in _walk(profiler.profiler.kineto_results.experimental_event_tree())
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
    ]
    allocations.sort(key=lambda e: e.start_time_ns)
    live: dict[int, tuple[int, object]] = {}
    total = peak = 0
    peak_live: dict[int, tuple[int, object]] = {}
    peak_index = 0
    for index, event in enumerate(allocations):
        size, ptr = event.extra_fields.alloc_size, event.extra_fields.ptr
        if size > 0:
            live[ptr] = (size, event)
            total += size
        elif ptr in live:
            total -= live.pop(ptr)[0]
        if total > peak:
            peak, peak_live, peak_index = total, dict(live), index
    rows = []
    for size, event in peak_live.values():
        op, frames = _context(event)
        rows.append({"mb": size / 2**20, "op": op, "frames": frames[:4], "t_ns": event.start_time_ns})
    rows.sort(key=lambda r: -r["mb"])
    # what was running at the peak: the context of the allocation that reached it
    at_peak = _context(allocations[peak_index]) if allocations else ("?", [])
    grouped = collections.Counter()
    for row in rows:
        grouped[(row["op"], " < ".join(row["frames"][:2]))] += row["mb"]
    return {
        "peak_mb": peak / 2**20,
        "at_peak": {"op": at_peak[0], "frames": at_peak[1][:6]},
        "largest": rows[:top],
        "grouped": [{"mb": mb, "op": k[0], "where": k[1]} for k, mb in grouped.most_common(top)],
        "small_total_mb": sum(r["mb"] for r in rows[top:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="crime-and-punishment")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--impl", default="ours", choices=["ours", "transformers"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps first")
    parser.add_argument("--json", help="write the breakdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step, _ = preset_step(args.impl, args.preset, args.length, "train")
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as profiler:
        step()
    result = breakdown(profiler, args.top)
    result.update(
        preset=args.preset,
        length=args.length,
        impl=args.impl,
        warmup_step_s=warm_s / max(1, args.warmup),
        max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(f"tensor peak {result['peak_mb']:.1f} MB at {result['at_peak']}")
    for row in result["largest"]:
        print(f"{row['mb']:9.1f} MB  {row['op']:<40} {' < '.join(row['frames'])}")
    print(f"{result['small_total_mb']:9.1f} MB  (the rest)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
