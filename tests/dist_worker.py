"""One rank of the 2-process gloo test (tests/test_distributed.py): DDP on a tiny model whose features go
through masked_mse(norm="batch", sync_stats=True), or clean_features(..., sync_stats=True) and F.mse_loss
("clean"), with this rank's shard of a shared batch."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fusedvq

D, K, IN = 23, 17, 6


def problem(total_rows: int, seed: int = 0):
    """The model's initial weights, inputs [N, IN], reconstruction [N, K], index [K] (shared by all ranks)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(IN, D)
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, IN, generator=g))
        model.bias.copy_(torch.randn(D, generator=g) * 5)
    inputs = torch.randn(total_rows, IN, generator=g)
    recon = torch.randn(total_rows, K, generator=g)
    index = torch.randint(0, D, (K,), generator=g)
    index[1] = index[0]  # a duplicate
    return model, inputs, recon, index


def column_weight(K: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, K)


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def train_step(rank: int, out_file: str, shards: str, backend: str, reduction: str) -> None:
    """One DDP step on this rank's shard; rank 0 saves the parameter gradients to out_file, every rank its
    loss to out_file.loss{rank}."""
    sizes = [int(s) for s in shards.split(",")]
    model, inputs, recon, index = problem(sum(sizes))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    ddp = DistributedDataParallel(model)
    if reduction == "clean":  # the VQ-led form: clean_features over all ranks' rows, then F.mse_loss
        z = fusedvq.clean_features(ddp(inputs[rows]), index, norm="batch", sync_stats=True, backend=backend)
        loss = torch.nn.functional.mse_loss(z, recon[rows])
    elif reduction == "column":  # this rank's per-column errors, weighted; back-propagated through their mean
        cols = fusedvq.masked_mse(ddp(inputs[rows]), recon[rows], index, norm="batch", sync_stats=True,
                                  reduction="column", weight=column_weight(recon.shape[1]), backend=backend)
        assert cols.shape == (recon.shape[1],)
        loss = cols.mean()
    else:
        loss = fusedvq.masked_mse(ddp(inputs[rows]), recon[rows], index, norm="batch", sync_stats=True,
                                  reduction=reduction, backend=backend)
        loss = loss if reduction != "none" else loss.sum()
    loss.backward()
    if rank == 0:
        torch.save({"weight": model.weight.grad, "bias": model.bias.grad}, out_file)
    torch.save({"loss": loss.detach()}, f"{out_file}.loss{rank}")


def disagree(rank: int, out_file: str, what: str, backend: str) -> None:
    """Rank 1 differs from rank 0 in `what` (K, dtype or eps): every rank must get a clear error, written to
    out_file.{rank}."""
    K = 6 if (what == "K" and rank == 1) else 5
    dtype = torch.float64 if (what == "dtype" and rank == 1) else torch.float32
    eps = 1e-3 if (what == "eps" and rank == 1) else 1e-8
    x, r = torch.randn(4, 8, dtype=dtype), torch.randn(4, K, dtype=dtype)
    try:
        fusedvq.masked_mse(x, r, torch.arange(K), norm="batch", sync_stats=True, eps=eps,
                           backend="reference" if dtype == torch.float64 else backend)
        message = "no error"
    except ValueError as err:
        message = str(err)
    with open(f"{out_file}.{rank}", "w") as f:
        f.write(message)


def session(rank: int, world: int, init_file: str, cases_file: str) -> None:
    """Every case of cases_file (JSON: a list of {"out": path, "step": [shards, backend, reduction]} or
    {"out": path, "disagree": [what, backend]}) in one process group, one after another: the processes and
    the group are set up once. A case that raises writes its traceback to out.error{rank}."""
    import json
    import traceback

    _init(rank, world, init_file)
    with open(cases_file) as f:
        cases = json.load(f)
    for case in cases:
        try:
            if "step" in case:
                train_step(rank, case["out"], *case["step"])
            else:
                disagree(rank, case["out"], *case["disagree"])
        except Exception:
            with open(f"{case['out']}.error{rank}", "w") as f:
                f.write(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "session":
        session(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    else:  # one step: RANK WORLD INIT_FILE OUT_FILE SHARDS BACKEND REDUCTION
        _init(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
        train_step(int(sys.argv[1]), *sys.argv[4:])
        dist.barrier()
        dist.destroy_process_group()
    # Every file is written and the group destroyed: leave without the interpreter's teardown, where a
    # thread of gloo's occasionally outlives its owner and aborts the process ("terminate called without an
    # active exception"), failing a run whose results were all in.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
