"""`fusedvq demo`: a short run trains (the loss falls), reports timings that say what they time, and is
deterministic."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ckpt_factory import make_plain_run, make_run, write_checkpoint, write_minimal_hybrid, write_npz

from fusedvq.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_timing_round(request, monkeypatch):
    """The demo times the training step in 5 rounds of 20 steps (about a second here); one round where the
    test does not read the timing (test_short_run_trains_and_reports reads it, and keeps the 5)."""
    if request.function is not test_short_run_trains_and_reports:
        from fusedvq.tools import demo

        monkeypatch.setattr(demo, "timing_line", functools.partial(demo.timing_line, rounds=1))


def run_demo(capsys, *argv) -> tuple[int, str, str]:
    code = main(["demo", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def loss_table(out: str) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[2])) for m in re.finditer(r"^\s+(\d+)\s+([0-9.e+-]+)$", out, re.M)]


def test_short_run_trains_and_reports(capsys):
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    code, out, _ = run_demo(capsys, "--steps", 60, "--batch-size", 64)
    assert code == 0
    assert "features    187 columns" in out and "keeps 171 of 187, grouped encoder over 8 categories" in out
    assert "device      cpu, backend reference" in out
    table = loss_table(out)
    assert table[0][0] == 1 and table[-1][0] == 60
    assert table[-1][1] < 0.5 * table[0][1], out  # the loss falls
    # every time printed says what it times
    assert re.search(r"^training time: [0-9.]+ s of wall time for the 60 steps above, [0-9.]+ ms per step "
                     r"\(model, FeatureCleaner, VQ-VAE, backward and Adam\)$", out, re.M)
    rel = float(re.search(r"relative difference ([0-9.e+-]+)", out)[1])
    assert rel < 1e-12  # float64: FeatureCleaner and the plain fix agree to rounding
    timing = re.search(r"^time per training step \(forward \+ backward without the optimizer, last batch of 64; "
                       r"median of 5 rounds of 20 steps, fastest–slowest round in parentheses\): "
                       r"fusedvq ([0-9.]+) ms \(([0-9.]+)–([0-9.]+)\), the plain fix ([0-9.]+) ms "
                       r"\(([0-9.]+)–([0-9.]+)\): (.*)$", out, re.M)
    assert timing, out
    fused, fused_lo, fused_hi, plain, plain_lo, plain_hi = map(float, timing.groups()[:6])
    assert fused_lo <= fused <= fused_hi and plain_lo <= plain <= plain_hi
    assert re.fullmatch(r"fusedvq is ([0-9.]+× (faster|slower)|as fast \(1\.00×\))|noisy: re-run on a quiet machine", timing[7])
    assert torch.get_num_threads() == threads  # the demo restores the thread setting
    assert torch.equal(torch.random.get_rng_state(), rng)  # and the caller's random state


def test_deterministic(capsys):
    _, first, _ = run_demo(capsys, "--steps", 12, "--batch-size", 32)
    _, second, _ = run_demo(capsys, "--steps", 12, "--batch-size", 32)
    assert loss_table(first) == loss_table(second)


def test_with_a_checkpoint(tmp_path, capsys):
    parts = make_plain_run(D=270, K=143, method="mad", seed=3)
    path = write_checkpoint(tmp_path / "ck", parts, stats_in_file=False, stats_beside=True)
    code, out, _ = run_demo(capsys, "--steps", 20, "--batch-size", 32, "--checkpoint", tmp_path / "ck")
    assert code == 0
    assert str(path) in out and "keeps 143 of 270" in out and "over 8 categories" in out
    assert "decoder of 143 columns" in out and "hybrid" not in out and "decoder space" not in out
    table = loss_table(out)
    assert table[-1][1] < table[0][1], out
    # not hybrid: the categories are the kept columns' (group_indices), in the checkpoint's order
    printed = category_table(out)
    assert list(printed) == list(parts.groups) and [k for k, _ in printed.values()] == [
        len(g) for g in parts.groups.values()]


def test_saved_default_checkpoint_passes_check(tmp_path, capsys):
    assert run_demo(capsys, "--steps", 2, "--save-checkpoint", tmp_path)[0] == 0
    assert main(["check", str(tmp_path), "--features", "187"]) == 0
    assert "ok: consistent" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["ck", "."])  # the folder above the checkpoint's, and its own
def test_saves_beside_an_unrelated_statistics_file(tmp_path, capsys, where):
    """A checkpoint carries its own statistics: an unrelated normalization_stats.npz near it is not used."""
    write_npz(tmp_path / "normalization_stats.npz", make_plain_run(D=50, K=40, num_categories=3, seed=5).per_category())
    code, out, err = run_demo(capsys, "--steps", 2, "--batch-size", 8, "--save-checkpoint", tmp_path / where)
    assert code == 0 and "not used" not in err, out + err  # the demo reads the statistics it wrote
    assert main(["check", str(tmp_path / where), "--features", "187"]) == 0
    out = capsys.readouterr().out
    assert "ok: consistent" in out and "note:" in out and f"{tmp_path / 'normalization_stats.npz'} was not used" in out


def test_errors(tmp_path, capsys):
    bad = write_checkpoint(tmp_path, make_plain_run(seed=4), edit=lambda c: c["model_config"].update(input_dim=170))
    code, out, _ = run_demo(capsys, "--checkpoint", bad, "--steps", 2)
    assert code == 1 and "input_dim is 170" in out
    assert run_demo(capsys, "--steps", 0)[0] == 2
    assert run_demo(capsys, "--device", "nonsense")[0] == 2
    if not torch.cuda.is_available():
        code, out, _ = run_demo(capsys, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in out


@pytest.mark.slow
def test_python_m_fusedvq_demo(warm_python):
    """The real entry point (`python -m fusedvq`, run by conftest's warm python) with its progress bar; the
    default demo's budget is 60 s on two cores."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([str(warm_python), "-m", "fusedvq", "demo", "--steps", "10", "--batch-size", "64"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "training" in proc.stderr and "10/10" in proc.stderr  # tqdm's bar
    assert "time per training step" in proc.stdout and "Traceback" not in proc.stderr
    assert elapsed < 60

    proc = subprocess.run([str(warm_python), "-m", "fusedvq"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "usage: fusedvq" in proc.stdout


def test_demo_shows_the_crash_it_prevents(capsys):
    assert main(["demo", "--steps", "3", "--batch-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "The size of tensor a (171) must match the size of tensor b (187)" in out
    # the silent failure: an encoder that selects by index runs on the raw features and reads wrong columns
    wrong = int(re.search(r"ran without an error and read the wrong column at (\d+) of its 171 inputs", out)[1])
    assert 0 < wrong <= 171
    assert "FeatureCleaner given 171-column features -> ValueError: features have 171 columns but the mask " \
           "was built for 187" in out


def category_table(out: str) -> dict[str, tuple[int, float]]:
    """The demo's closing lines: {category: (its columns, its error)}."""
    return {m[1]: (int(m[2]), float(m[3]))
            for m in re.finditer(r"^  (\S+)\s+(\d+) columns\s+([0-9.e+-]+)", out, re.M)}


def test_with_a_hybrid_checkpoint(tmp_path, capsys):
    """A hybrid checkpoint that `fusedvq check` calls consistent: the demo trains the hybrid step (the
    objective over all K + c decoder columns) and reports its categories in decoder space."""
    path = write_minimal_hybrid(tmp_path / "hybrid.pt")
    assert main(["check", str(path), "--features", "20"]) == 0 and "ok: consistent" in capsys.readouterr().out
    code, out, err = run_demo(capsys, "--steps", 20, "--batch-size", 16, "--checkpoint", path)
    assert code == 0, out + err
    assert "keeps 16 of 20" in out and "decoder of 19 columns" in out and "3 embedding columns" in out
    assert "F.mse_loss(recon, combine(z, embeddings))" in out
    table = loss_table(out)
    assert table[0][0] == 1 and table[-1][0] == 20 and table[-1][1] < table[0][1], out
    # decoder space: the 'initial' category holds its 4 feature columns and the 3 embedding columns
    assert {n: k for n, (k, _) in category_table(out).items()} == {"summary": 4, "initial": 7, "temporal": 8}


def test_hybrid_category_errors_are_the_trainers(tmp_path, capsys):
    """The printed errors are the trainer's: F.mse_loss(recon, combined) and, per category, F.mse_loss over
    its decoder columns (model_config's group_indices, the INITIAL category with the embedding columns),
    computed here from a float64 replay of the demo's one step: the oracle's z, torch.cat's combined input."""
    from oracle import oracle_z

    from fusedvq import load_feature_spec
    from fusedvq.tools.hybrid_step import hybrid_world
    from fusedvq.tools.world import NUM_TOKENS, SEED, make_model

    run = make_run(hybrid=True, seed=7, families={"summary": 40, "initial": 14, "temporal": 40}, gap_width=6,
                   num_categories=4)
    path = write_checkpoint(tmp_path / "run", run)
    B = 24
    code, out, err = run_demo(capsys, "--steps", 1, "--batch-size", B, "--checkpoint", path)
    assert code == 0, out + err
    printed = category_table(out)

    # the step replayed: the demo's stand-in world and model (seeded as the demo seeds them), its first batch
    spec, groups, p, c = load_feature_spec(path), run.decoder_groups(), run.gap_at, run.gap_width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        world = hybrid_world(spec, spec.mean, spec.std, groups, torch.Generator().manual_seed(SEED))
        model = make_model()
    tokens = torch.randint(NUM_TOKENS, (B,), generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        u = model(tokens)
        z = oracle_z(world.extractor(u).double(), spec.index, None, None, "batch", nan_to_num=True)
        combined = torch.cat([z[:, :p], world.initial(u).double(), z[:, p:]], 1)
        recon = world.vq(combined.float())[0].double()
    assert recon.shape[1] == run.K + c
    objective = float(re.search(r"F\.mse_loss's one number is ([0-9.e+-]+)", out)[1])
    assert objective == pytest.approx(F.mse_loss(recon, combined).item(), rel=1e-3)
    expected = {name: F.mse_loss(recon[:, cols], combined[:, cols]).item() for name, cols in groups.items()}
    assert list(printed) == list(groups) and {n: k for n, (k, _) in printed.items()} == {
        n: len(cols) for n, cols in groups.items()}
    for name, (_, value) in printed.items():
        assert value == pytest.approx(expected[name], rel=1e-3), (name, out)
    # the INITIAL category counts its embedding columns: its feature columns alone give another number
    initial = next(n for n, cols in groups.items() if p in cols)
    features_only = [k for k in groups[initial] if not p <= k < p + c]
    alone = F.mse_loss(recon[:, features_only], combined[:, features_only]).item()
    assert abs(alone - printed[initial][1]) > 0.01 * alone
