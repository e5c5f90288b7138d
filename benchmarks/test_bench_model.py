"""Per-model benchmarks: eval forward and train step (forward + backward) on the same weights.

``ours`` is this project's ``reformer`` model (or transformers' model routed through our ops while
the model stack is missing), ``transformers`` the unmodified transformers Reformer, ``dense`` the
same weights with full causal ``F.scaled_dot_product_attention`` in every attention layer.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE
from reformer.bench.harness import build_model, make_step

pytest.importorskip("transformers")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("impl", ["ours", "transformers", "dense"])
def test_model(benchmark, bench_config, impl, mode):
    seq_len = bench_config["max_position_embeddings"]
    model, _ = build_model(impl, bench_config, seed=0, device=DEVICE)
    input_ids = torch.randint(0, bench_config["vocab_size"], (1, seq_len), device=DEVICE)
    result = benchmark(make_step(model, mode, input_ids))
    if mode == "eval":
        assert result.shape == (1, seq_len, bench_config["vocab_size"])
        if impl == "ours":
            # same weights, same outputs as transformers
            reference, _ = build_model("transformers", bench_config, seed=0, device=DEVICE)
            torch.testing.assert_close(result, make_step(reference, "eval", input_ids)(), atol=1e-4, rtol=1e-4)
    else:
        assert torch.isfinite(result) and result > 0
        if impl == "ours":
            reference, _ = build_model("transformers", bench_config, seed=0, device=DEVICE)
            torch.testing.assert_close(result, make_step(reference, "train", input_ids)(), atol=1e-5, rtol=1e-5)
