"""Graph breaks of ``torch.compile`` on a tiny Reformer: ours vs transformers' ``ReformerModelWithLMHead``.

    PYTHONPATH=. python benchmarks/compile_graph_breaks.py            # the table
    PYTHONPATH=. python benchmarks/compile_graph_breaks.py --reasons  # and each break's reason

Counts come from ``torch._dynamo.explain`` on the same config and weights (local + LSH layers, causal, 2 hash
rounds, CPU, ops backend ``torch``). "eval": the forward under ``torch.no_grad``; "train": the training forward
(train mode, ``labels``: the loss), which is what ``torch.compile`` captures of a training step (AOTAutograd
derives the backward from that graph; ``loss.backward()`` itself runs outside the compiled function).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch._dynamo

import reformer
import reformer_kernels
from reformer.bench.harness import PRESETS

# harness' "tiny" preset (the suite's sizes) on a fixed 8 x 8 grid: 64 positions, as tests/test_torch_compile.py
CONFIG = {
    **PRESETS["tiny"],
    "num_buckets": 4,
    "axial_pos_shape": [8, 8],
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


def models() -> dict[str, torch.nn.Module]:
    """Ours and transformers' LM-head model with the same weights."""
    import transformers

    torch.manual_seed(0)
    ours = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CONFIG))
    theirs = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**CONFIG))
    theirs.load_state_dict(ours.state_dict())
    return {"reformer-kernels": ours, "transformers": theirs}


def explain(model: torch.nn.Module, input_ids: torch.Tensor, mode: str):
    """``torch._dynamo.explain`` of the eval forward or the training forward (see the module docstring)."""
    torch._dynamo.reset()
    if mode == "eval":
        model.eval()
        with torch.no_grad():
            return torch._dynamo.explain(model)(input_ids)
    model.train()
    return torch._dynamo.explain(model)(input_ids, labels=input_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # transformers' training forward needs the length to equal prod(axial_pos_shape) = 64
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reasons", action="store_true", help="print each graph break's reason")
    args = parser.parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the table lists the breaks; no log per break
    input_ids = torch.randint(1, CONFIG["vocab_size"], (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows, reasons = [], []
    with reformer_kernels.backend("torch"):
        for name, model in models().items():
            for mode in ("eval", "train"):
                try:
                    explained = explain(model, input_ids, mode)
                except Exception as error:  # a model Dynamo cannot trace at all: say so in the table
                    rows.append((name, mode, "-", "-", f"{type(error).__name__}: {str(error).splitlines()[0]}"))
                    continue
                rows.append((name, mode, str(explained.graph_count), str(explained.graph_break_count), ""))
                reasons += [(name, mode, b.reason) for b in explained.break_reasons]
    print(f"torch {torch.__version__}, CPU, tiny config (2 layers local + LSH), batch 2, L={args.seq_len}\n")
    print("| model | step | graphs | graph breaks | error |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.reasons:
        print()
        for name, mode, reason in reasons:
            print(f"{name} {mode}: {reason.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
