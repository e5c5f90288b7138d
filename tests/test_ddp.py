"""Training under DistributedDataParallel (2 processes, gloo, CPU) equals one process on the global batch.

transformers' Reformer fails here (checked with torch 2.13): its reversible backward accumulates the
parameter gradients with nested ``backward()`` calls, so after step 1 the ranks hold different,
un-reduced layer gradients and step 2 raises "Expected to have finished reduction in the prior
iteration". Ours returns the gradients from the autograd Function, so DDP's reducer all-reduces them
like any other gradient. Two steps are run because that failure only surfaces on the second.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_testing import tiny_config

WORLD_SIZE = 2
CONFIG = tiny_config(attn_layers=["lsh", "local", "lsh"], num_hashes=2, num_buckets=4, hash_seed=5, is_decoder=True)
LR = 0.5


def _model():
    import reformer

    torch.manual_seed(0)
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_(mean=1.0, std=0.5)
    return model.train()


STEPS = 2


def _global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, 37, (2 * WORLD_SIZE, 32), generator=generator) for _ in range(STEPS)]


def _train(model, batches):
    """SGD steps; returns per-step losses and gradients and the final parameters."""
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for ids in batches:
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.detach().clone() for name, p in module.named_parameters() if p.requires_grad})
        optimizer.step()
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    return losses, grads, params


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        local = [batch.chunk(WORLD_SIZE)[rank] for batch in _global_batches()]
        losses, grads, params = _train(model, local)
        torch.save({"losses": losses, "grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)
def test_ddp_two_processes_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    reference_losses, reference_grads, reference_params = _train(_model(), _global_batches())
    for step in range(STEPS):
        # equal token counts per rank and no ignored labels: the mean of the per-rank means is the global mean
        mean_loss = sum(r["losses"][step].item() for r in results) / WORLD_SIZE
        assert abs(mean_loss - reference_losses[step].item()) <= 1e-6, step
        assert len(reference_grads[step]) > 40
        for name, expected in reference_grads[step].items():
            for result in results:
                got = result["grads"][step][name]
                assert (got - expected).norm() <= 1e-5 * expected.norm() + 1e-9, (step, name)
    for name, expected in reference_params.items():
        for result in results:
            assert torch.allclose(result["params"][name], expected, rtol=0, atol=1e-6), name
    # the steps moved the parameters (the comparison above is not between untouched copies)
    initial = dict(_model().named_parameters())
    assert any(not torch.equal(reference_params[name], initial[name]) for name in reference_params)
