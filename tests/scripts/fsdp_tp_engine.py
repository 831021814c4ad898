"""The torch engine on 2-D parallel gradients (FSDP2 over tensor parallelism), four CPU processes.

    python fsdp_tp_engine.py OUTPUT_DIR

Run by ``tests/test_distributed.py``. A (data_parallel=2, tensor_parallel=2) mesh on gloo: every
layer is tensor parallel (column-wise, then row-wise twice) and then ``fully_shard`` over the
data-parallel dimension, so the gradients mix the layouts the engine must reduce:
``(_StridedShard(0), Shard(0))``, ``(Shard(0), Shard(1))``, ``(Shard(0), Replicate())``, and
the one-row last layer leaves data-parallel rank 1 with empty shards. (A column-wise last layer
would leave a tensor-parallel rank empty, which FSDP2's reduce-scatter rejects:
"_chunk_cat expects non-empty tensor".) Each rank writes ``OUTPUT_DIR/rank<r>.json`` with the
records of its engine, the placements it saw, the sizes of its local shards and the full
gradients before every optimizer step.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from _records import as_json
from torch import nn

WORLD = 4


def run(rank: int, out: str, port: str) -> None:
    # The same model and data as the Lightning runs; this file's folder is sys.path[0].
    from distributed_gradwatch import (
        BINS,
        HISTOGRAM_EVERY,
        LEARNING_RATE,
        LOG_EVERY,
        STEPS,
        make_net,
        rank_batch,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from gradwatch.cadence import Cadence
    from gradwatch.integrations.torch import TorchEngine
    from gradwatch.tags import STATISTICS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    net = make_net()
    parallelize_module(
        net,
        mesh["tensor_parallel"],
        {
            "0": ColwiseParallel(),
            "2": RowwiseParallel(),
            "4": RowwiseParallel(input_layouts=Replicate()),
        },
    )
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(net, mesh=mesh["data_parallel"])
    named = [(f"net.{n}", p) for n, p in net.named_parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE["fsdp"])
    engine = TorchEngine(
        named,
        cadence=Cadence(LOG_EVERY, HISTOGRAM_EVERY),
        track_update_ratio=True,
        histogram_bins=BINS,
        statistics=STATISTICS,
    )
    x, y = rank_batch(mesh["data_parallel"].get_local_rank())
    records, gradients = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        gradients.append({n: p.grad.full_tensor().flatten().tolist() for n, p in named})
        engine.before_optimizer_step(optimizer)
        optimizer.step()
        records.extend(engine.after_optimizer_step())
    result = {
        "rank": rank,
        "placements": {n: str(tuple(p.grad.placements)) for n, p in named},
        "local_sizes": {n: p.grad.to_local().numel() for n, p in named},
        "gradients": gradients,
        "records": [as_json(r) for r in records],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1], os.environ["MASTER_PORT"]), nprocs=WORLD)
