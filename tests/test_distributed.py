"""Cross-rank statistics over 2 gloo processes (files for rendezvous: no network), uneven shards included:
after DDP's averaging, the parameter gradients equal a single process's that computes the statistics over
all rows and averages the per-rank losses."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dist_worker
from helpers import interpreting

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def single_process_grads(sizes, reduction):
    """float64 autograd: μ, σ over all rows, each rank's loss on its rows, their average ("clean": the same
    as "mean", computed by clean_features then F.mse_loss on each rank)."""
    reduction = "mean" if reduction == "clean" else reduction
    model, inputs, recon, index = dist_worker.problem(sum(sizes))
    model = model.double()
    feats = model(inputs.double())
    mean = feats.mean(0)
    std = ((feats - mean).square().sum(0) / (feats.shape[0] - 1)).sqrt()
    z = ((feats - mean) / std)[:, index]
    losses, start = [], 0
    for n in sizes:
        if reduction == "column":  # this rank's weighted column errors, then their mean
            e = (z[start:start + n] - recon[start:start + n].double()).square() * dist_worker.column_weight(z.shape[1])
            losses.append(e.mean(0).mean() if n else z.new_zeros(()))
            start += n
            continue
        part = F.mse_loss(z[start:start + n], recon[start:start + n].double(), reduction=reduction)
        losses.append(part.sum() if reduction == "none" else (part if n else z.new_zeros(())))
        start += n
    total = sum(losses) / len(sizes)
    total.backward()
    return {"weight": model.weight.grad, "bias": model.bias.grad}, losses


BACKENDS = ["reference"] + (["triton"] if interpreting else [])
STEPS = [((7, 4), "mean"), ((6, 0), "mean"), ((3, 9), "none"), ((5, 8), "clean"), ((6, 5), "column"), ((0, 7), "column")]
# The header check is the merge's, shared by both backends: the Triton path is run for K only.
DISAGREEMENTS = [("reference", "K"), ("reference", "dtype"), ("reference", "eps")] + (
    [("triton", "K")] if interpreting else [])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, warm_python):
    """Two rank processes (children of conftest's warm python) that run every case of this file in one gloo
    group (started once: a process's start costs seconds, its cases milliseconds): (case name → the path its
    files were written under, the processes' output if they failed). A case that raises on one rank only leaves the other waiting in a
    collective: the group times out and the later cases fail as not written."""
    folder = tmp_path_factory.mktemp("ranks")
    cases, outs = [], {}
    for backend in BACKENDS:
        for sizes, reduction in STEPS:
            name = f"step-{backend}-{'-'.join(map(str, sizes))}-{reduction}"
            cases.append({"out": str(folder / name), "step": [",".join(map(str, sizes)), backend, reduction]})
            outs[name] = folder / name
    for backend, what in DISAGREEMENTS:
        name = f"disagree-{backend}-{what}"
        cases.append({"out": str(folder / name), "disagree": [what, backend]})
        outs[name] = folder / name
    (folder / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([str(warm_python), str(HERE / "dist_worker.py"), "session", str(rank), "2",
                               str(folder / "rendezvous"), str(folder / "cases.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stopped = "" if all(p.returncode == 0 for p in procs) else "\n".join(o[-3000:] for o in outputs)
    return outs, stopped


def _written(ranks, name: str, files) -> Path:
    """The path of case `name`'s files; fails with a rank's traceback where the case raised there, or with
    the processes' output where they stopped before writing `files` (suffixes of that path)."""
    outs, stopped = ranks
    out = outs[name]
    for rank in range(2):
        error = Path(f"{out}.error{rank}")
        assert not error.exists(), f"rank {rank}:\n{error.read_text()}"
    missing = [f for f in files if not Path(f"{out}{f}").exists()]
    assert not missing, f"the ranks stopped before this case wrote {missing}:\n{stopped}"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,reduction", STEPS)
def test_two_ranks_match_single_process(ranks, backend, sizes, reduction):
    out = _written(ranks, f"step-{backend}-{'-'.join(map(str, sizes))}-{reduction}", ["", ".loss0", ".loss1"])
    got, losses = torch.load(out), [torch.load(f"{out}.loss{rank}")["loss"] for rank in range(2)]
    want, want_losses = single_process_grads(sizes, reduction)
    # One norm over all parameters: the bias gradient alone is ~0 (batch statistics remove any shift).
    got_all = torch.cat([got[n].double().flatten() for n in ("weight", "bias")])
    want_all = torch.cat([want[n].flatten() for n in ("weight", "bias")])
    err = (got_all - want_all).norm() / want_all.norm()
    assert err <= 1e-5, f"relative error {err:.2e}"
    for loss, want_loss in zip(losses, want_losses):
        assert torch.isfinite(loss) and abs(loss.item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item()))


@pytest.mark.parametrize("backend, what", DISAGREEMENTS)
def test_ranks_that_disagree_get_a_clear_error_on_every_rank(ranks, backend, what):
    """K = 5 on one rank and 6 on the other aborted the process inside gloo; now both ranks raise."""
    out = _written(ranks, f"disagree-{backend}-{what}", [".0", ".1"])
    for rank in range(2):
        message = Path(f"{out}.{rank}").read_text()
        assert "every rank must pass the same" in message and "rank 0: K = 5" in message, message
