"""fusedvq.tools.benchmark: the byte model, the target verdicts, and a run on tiny sizes whose reports (JSON,
Markdown, PNG) must exist and be well-formed — through `fusedvq bench` as users call it."""

import argparse
import json
import struct

import pytest
import torch

from fusedvq.tools import benchmark as fb
from fusedvq.tools import cli


def _args(*argv):
    parser = argparse.ArgumentParser()
    fb.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bytes_moved_counts_each_pass():
    for dtype, e in (("float32", 4), ("bfloat16", 2)):
        B, D, K = 3, 11, 7
        fwd = fb.bytes_moved(fb.Case(B, dtype, "stats", "forward", D, K))
        both = fb.bytes_moved(fb.Case(B, dtype, "stats", "forward+backward", D, K))
        batch = fb.bytes_moved(fb.Case(B, dtype, "batch", "forward", D, K))
        assert fwd == (B * K + B * K) * e + e  # x's kept columns, r, the scalar loss
        assert both - fwd == (B * K + B * K + B * D + B * K) * e  # x, r again; grad_x; grad_r
        assert batch - fwd == B * K * e  # the statistics pass reads x's kept columns once more


def test_matrix_puts_target_cases_first():
    cases = fb.matrix((4, 64), fb.DTYPES, fb.NORMS, fb.MODES)
    assert len(cases) == 2 * len(fb.DTYPES) * len(fb.NORMS) * len(fb.MODES)
    head = cases[:2]
    assert all((c.norm, c.dtype, c.mode) == ("stats", "float32", "forward+backward") for c in head)


def test_vq_step_cases_follow_the_targets_and_run_checked():
    cases = fb.matrix((4, 64, 1024), ("float32", "bfloat16"), fb.NORMS, fb.MODES)
    targets = [c for c in cases if (c.norm, c.dtype, c.mode) == ("stats", "float32", "forward+backward")]
    after = cases[len(targets) : len(targets) + 4]
    assert cases[: len(targets)] == targets
    assert all(c.mode == "clean+mse" and c.dtype == "float32" and c.B in (4, 1024) for c in after)
    B, D, K = 3, 11, 7
    e = 4
    stats = fb.bytes_moved(fb.Case(B, "float32", "stats", "clean+mse", D, K))
    batch = fb.bytes_moved(fb.Case(B, "float32", "batch", "clean+mse", D, K))
    # clean: x, z; mse: z, r; its backward: z, r, grad_z, grad_r; clean's backward: grad_z, x, grad_x
    assert stats == (2 + 2 + 4 + 2) * B * K * e + B * D * e
    assert batch - stats == 3 * B * K * e  # x once more forward, grad_z and x once more backward
    for norm in fb.NORMS:  # every provider's value is checked against float64 before it is timed
        case = fb.Case(4, "float32", norm, "clean+mse", D, K)
        rows = {row.provider: row for row in fb.run_case(case, ("reference", "eager"), "cpu", 0.01, None)}
        assert rows["reference"].status == "ok" and rows["eager"].status == "ok", rows
        assert rows["reference"].ms and rows["eager"].ms


def _row(provider, B, ms, **kw):
    return fb.Row(provider, B, fb.D, fb.K, "float32", "stats", "forward+backward", "ok", ms=ms, **kw)


def test_verdicts_pass_and_miss():
    rows = [_row("reference", 65536, 10.0), _row("eager", 65536, 35.0), _row("compiled", 65536, 15.0),
            _row("reference", 4, 0.1), _row("eager", 4, 0.1)]
    by_target = {(v["B"], v["baseline"]): v for v in fb.verdicts(rows, "cpu")}
    assert by_target[(65536, "eager")]["verdict"] == "pass"
    assert by_target[(65536, "eager")]["measured"] == pytest.approx(3.5)
    compiled = by_target[(65536, "compiled")]
    assert compiled["measured"] == pytest.approx(1.5) and compiled["verdict"] == "miss by 25%"
    assert by_target[(4, "eager")]["verdict"].startswith("miss") and by_target[(4, "eager")]["why"]
    gpu = fb.verdicts(rows + [_row("fused", 65536, 1.0, copy_fraction=0.9)], "cuda")
    assert {v["verdict"] for v in gpu if v["baseline"] == "copy"} == {"pass"}
    assert {v["verdict"] for v in gpu if v["B"] == 4} == {"not measured"}
    slow = fb.verdicts(rows + [_row("fused", 65536, 20.0, copy_fraction=0.3)], "cuda")
    missed = [v for v in slow if v["verdict"].startswith("miss")]
    assert missed and all("30% of the copy rate" in v["why"] and "overhead" in v["why"] for v in missed)


def test_eager_provider_is_the_straightforward_fix():
    case = fb.Case(5, "float32", "stats", "forward")
    inputs = fb.make_inputs(case, "cpu")
    mask, mean, std = fb.make_statistics("cpu")
    want = ((inputs.x.double() - mean.double()) / std.double())[:, mask].sub(inputs.r.double()).square().mean()
    for provider in ("eager", "reference"):
        got = fb.make_loss(provider, case, "cpu")(inputs.x, inputs.r)
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    with pytest.raises(fb.Unavailable, match="CUDA"):
        fb.make_loss("fused", case, "cpu")


class _KeepsOnContext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r):
        ctx.kept = (x * 2, None)  # held for the backward without save_for_backward
        return x.sum() + r.sum()

    @staticmethod
    def backward(ctx, grad):
        return ctx.kept[0] * grad / 2, None


def test_saved_bytes_counts_what_the_graph_keeps():
    case = fb.Case(64, "float32", "stats", "forward+backward")
    inputs = fb.make_inputs(case, "cpu")
    eager = fb.saved_bytes(fb.make_loss("eager", case, "cpu"), inputs)
    assert eager >= case.B * case.K * 4  # the normalized, gathered features
    assert fb.saved_bytes(lambda x, r: (x * 2).sum() + r.sum(), inputs) == 0  # x is an input: not counted
    assert fb.saved_bytes(_KeepsOnContext.apply, inputs) == case.B * case.D * 4


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_bench_command_writes_three_reports(tmp_path, capsys):
    out = tmp_path / "reports"
    code = cli.main(["bench", "--device", "cpu", "--quick", "--sizes", "4,8", "--norms", "stats,batch",
                     "--providers", "fused,reference,eager", "--seconds-per-case", "0.02", "--no-progress",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and "--quick" in meta["command"]
    assert meta["copy_bandwidth_gbps"] > 0 and meta["cpus"] >= 1 and "load_average" in meta
    assert len(rows) == 2 * 2 * len(fb.MODES) * 3  # sizes × norms × modes × providers
    for row in rows:
        if row["provider"] == "fused":
            assert row["status"].startswith("unavailable")
        elif row["status"] == "ok":
            assert row["ms"] > 0 and row["gbps"] > 0 and row["rounds"] >= 5
            assert row["bytes"] == fb.bytes_moved(fb.Case(row["B"], row["dtype"], row["norm"], row["mode"]))
    ok = {(r["provider"], r["norm"]) for r in rows if r["status"] == "ok"}
    assert {("reference", "stats"), ("eager", "stats"), ("eager", "batch")} <= ok
    md = (out / "bench.md").read_text()
    assert md == printed.split("\nwrote ")[0]
    assert "## norm=stats, float32, forward+backward" in md and "| B | fused | reference | eager |" in md
    assert "## Targets" in md and "reference ≥ 2× faster than eager at B = 4" in md
    for row in rows:  # every timed cell carries its spread, and the table shows it
        if row["status"] == "ok":
            assert row["ms_min"] <= row["ms"] <= row["ms_max"]
    ref = next(r for r in rows if r["provider"] == "reference" and r["status"] == "ok")
    assert f"({ref['ms_min']:.4g}–{ref['ms_max']:.4g})" in md
    width, height = _png_size(out / "bench.png")
    assert width > 300 and height > 200


def test_results_section_names_device_and_command(tmp_path):
    case_rows = [_row("reference", 4, 0.2, gbps=1.0), _row("eager", 4, 0.3)]
    report = {"meta": fb.environment("cpu", 1e10, "fusedvq bench --device cpu --quick --out x"),
              "rows": [vars(r) for r in case_rows], "targets": fb.verdicts(case_rows, "cpu")}
    section = fb.results_section([report], ["bench/results/cpu"])
    assert section.startswith("## Results")
    assert report["meta"]["device_name"] in section and "`fusedvq bench --device cpu --quick --out x`" in section
    assert "#### norm=stats, float32, forward+backward" in section and "#### Targets" in section
    assert "](bench/results/cpu/bench.png)" in section and "(bench/results/cpu/bench.md)" in section
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert fb.run(_args("--results-section", str(path))) == 0


def test_results_section_links_from_the_docs_page(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "bench" / "results" / "cpu"
    folder.mkdir(parents=True)
    case_rows = [_row("reference", 4, 0.2, gbps=1.0), _row("eager", 4, 0.3)]
    report = {"meta": fb.environment("cpu", 1e10, "cmd"), "rows": [vars(r) for r in case_rows], "targets": []}
    (folder / "bench.json").write_text(json.dumps(report))
    monkeypatch.chdir(tmp_path)  # the repository root: the section goes into docs/benchmarks.md
    assert fb.run(_args("--results-section", "bench/results/cpu/bench.json")) == 0
    assert "](../bench/results/cpu/bench.png)" in capsys.readouterr().out


def test_cuda_requested_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert fb.run(_args("--device", "cuda")) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_wrong_answer_is_reported_not_timed(monkeypatch):
    case = fb.Case(16, "float32", "stats", "forward+backward")
    build = fb.make_loss

    def off_by_a_little(provider, case, device):
        loss_fn = build(provider, case, device)
        return (lambda x, r: loss_fn(x, r) * 1.001) if provider == "reference" else loss_fn

    monkeypatch.setattr(fb.runs, "make_loss", off_by_a_little)  # where run_case looks it up
    rows = {row.provider: row for row in fb.run_case(case, ("reference", "eager"), "cpu", 0.01, None)}
    assert rows["reference"].status.startswith("error: ValueError: loss") and rows["reference"].ms is None
    assert rows["eager"].status == "ok" and rows["eager"].ms > 0


def test_copy_target_uses_kernel_time_and_misses_say_what_bounds_the_step():
    fused = _row("fused", 65536, 0.7, copy_fraction=0.1, device_ms=0.13, device_copy_fraction=0.5)
    rows = [fused, _row("eager", 65536, 3.5), _row("compiled", 65536, 8.8)]
    by = {v["baseline"]: v for v in fb.verdicts(rows, "cuda") if v["B"] == 65536}
    assert by["copy"]["measured"] == pytest.approx(0.5) and "(kernel time)" in by["copy"]["target"]
    assert by["copy"]["verdict"] == "miss by 38%" and "the kernels, not the host" in by["copy"]["why"]
    assert by["eager"]["verdict"] == "miss by 50%" and by["eager"]["why"].startswith("host-bound")
    assert by["compiled"]["verdict"] == "pass"
    meta = {**fb.environment("cpu", None, "cmd"), "device": "cuda"}
    md = fb.markdown({"meta": meta, "rows": [vars(r) for r in rows], "targets": []})
    assert "kernels 0.13 ms" in md and "(50% of copy)" in md


def test_eager_baseline_computes_in_the_features_dtype():
    case = fb.Case(8, "bfloat16", "stats", "forward+backward")
    inputs = fb.make_inputs(case, "cpu")
    loss = fb.make_loss("eager", case, "cpu")(inputs.x, inputs.r)
    assert loss.dtype == torch.bfloat16  # float32 statistics would promote it (and break its CUDA backward)
    loss.backward()
    assert inputs.x.grad.dtype == torch.bfloat16


# --- spread, wording and the noisy flag, from synthetic timings ----------------------------------------------


def _timed(provider, B, ms, lo, hi):
    return _row(provider, B, ms, ms_min=lo, ms_max=hi, rounds=20)


def test_ratios_read_faster_or_slower():
    assert fb.speed_words(3.04) == "3.04× faster" and fb.speed_words(1.006) == "1.01× faster"
    assert fb.speed_words(1.0) == fb.speed_words(0.999) == "as fast (1.00×)"
    assert fb.speed_words(0.5) == "2.00× slower" and fb.speed_words(0.92) == "1.09× slower"
    ours, quick, slow = _timed("reference", 4, 1.0, 0.9, 1.2), _timed("eager", 4, 0.5, 0.45, 0.6), \
        _timed("compiled", 4, 3.0, 2.8, 3.3)
    assert fb.compare(ours, slow) == "3.00× faster" and fb.compare(ours, quick) == "2.00× slower"
    assert fb.compare(ours, None) == "–" and fb.compare(ours, _row("eager", 4, None)) == "–"
    # a report written before the rounds' spread was recorded still ranks by its medians
    assert fb.compare(_row("reference", 4, 1.0), _row("eager", 4, 2.0)) == "2.00× faster"


def test_a_wide_spread_is_flagged_not_ranked():
    quiet = _timed("reference", 64, 0.11, 0.10, 0.15)
    loaded = _timed("eager", 64, 13.0, 10.6, 23.7)  # rounds preempted: slowest 2.2× the fastest
    assert not fb.is_noisy(quiet) and fb.is_noisy(loaded) and fb.is_noisy(quiet, loaded)
    assert fb.compare(quiet, loaded) == fb.NOISY == "noisy: re-run on a quiet machine"  # not "118× faster"
    edge = _timed("eager", 64, 0.2, 0.1, 0.1 * fb.NOISY_SPREAD)  # at the limit: still ranked
    assert fb.compare(quiet, edge) == "1.82× faster"


def test_markdown_carries_spreads_and_flags_noisy_cells():
    rows = [_timed("reference", 4, 0.0880, 0.0834, 0.1141), _timed("eager", 4, 0.0657, 0.0625, 0.0769),
            _timed("compiled", 4, 0.2907, 0.2624, 0.4513),
            _timed("reference", 64, 0.1138, 0.1036, 0.1458), _timed("eager", 64, 13.07, 10.58, 23.70),
            _timed("compiled", 64, 0.3746, 0.3494, 0.4483)]
    meta = fb.environment("cpu", None, "cmd")
    md = fb.markdown({"meta": meta, "rows": [vars(r) for r in rows], "targets": fb.verdicts(rows, "cpu")})
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
             if line.startswith("| 4 |") or line.startswith("| 64 |")}
    assert "| reference vs eager | reference vs compiled |" in md
    assert table["4"][1:4] == ["0.088 (0.0834–0.1141)", "0.0657 (0.0625–0.0769)", "0.2907 (0.2624–0.4513)"]
    assert table["4"][4:6] == ["1.34× slower", "3.30× faster"]
    assert table["64"][4:6] == ["noisy: re-run on a quiet machine", "3.29× faster"]
    assert "Where either cell's slowest round took more than 2× its fastest" in md
    b4 = next(line for line in md.splitlines() if "faster than eager at B = 4" in line)
    assert "0.088 (0.0834–0.1141) / 0.0657 (0.0625–0.0769)" in b4 and "1.34× slower" in b4 and "miss by 6" in b4


def test_noisy_cells_get_no_verdict():
    rows = [_timed("reference", 65536, 50.0, 41.0, 57.0), _timed("eager", 65536, 143.0, 60.0, 158.0),
            _timed("compiled", 65536, 129.0, 119.0, 144.0), _timed("reference", 4, 0.1, 0.09, 0.3),
            _timed("eager", 4, 0.2, 0.19, 0.21)]
    by = {(v["B"], v["baseline"]): v for v in fb.verdicts(rows, "cpu")}
    assert by[(65536, "eager")]["verdict"] == fb.NOISY and "why" not in by[(65536, "eager")]
    assert by[(65536, "eager")]["measured"] == pytest.approx(143 / 50)  # still recorded in bench.json
    assert by[(65536, "compiled")]["verdict"] == "pass"
    assert by[(65536, "compiled")]["ours_range_ms"] == [41.0, 57.0]
    assert by[(4, "eager")]["verdict"] == fb.NOISY  # ours spread 3.3×: a pass it cannot claim


def test_a_busy_machine_is_said_at_the_top_of_the_report_and_in_the_verdicts():
    rows = [_row("reference", 65536, 10.0), _row("eager", 65536, 35.0), _row("compiled", 65536, 15.0),
            _row("reference", 4, 0.2), _row("eager", 4, 0.1)]
    meta = fb.environment("cpu", None, "cmd")
    # One other process on one of two CPUs during the run, while torch used both: nothing is ranked.
    busy_meta = {**meta, "load_average": 0.2, "load_average_after": 1.1, "cpus": 2, "threads": 2, "others_cpus": 1.0}
    reason = fb.busy_reason(busy_meta)
    assert "other processes kept 1.0 of its 2 CPUs busy" in reason and "OMP_NUM_THREADS=1" in reason
    targets = fb.verdicts(rows, "cpu", reason)
    assert {t["verdict"] for t in targets} == {fb.BUSY} and all(t["why"] == reason for t in targets)
    assert [t["measured"] for t in targets] == [t["measured"] for t in fb.verdicts(rows, "cpu")]  # still recorded
    busy = fb.markdown({"meta": busy_meta, "rows": [vars(r) for r in rows], "targets": targets})
    assert busy.index("**Busy machine:**") < busy.index("## norm=") and "busy machine: not ranked —" in busy
    # Without CPU counters, the load averages before and after stand in.
    assert "load average was 1.86 on 2 CPUs" in fb.busy_reason({"load_average": 0.1, "load_average_after": 1.86,
                                                                "cpus": 2, "threads": 2})
    # Oversubscribed: 0.4 CPUs taken by others leave too few for torch's 2 threads.
    assert fb.busy_reason({"cpus": 2, "threads": 2, "others_cpus": 0.4, "load_average": 0.4}) is None
    assert "OMP_NUM_THREADS=1" in fb.busy_reason({"cpus": 2, "threads": 4, "others_cpus": 0.4})
    for quiet in ({"load_average": 0.3, "cpus": 2}, {"load_average": None, "cpus": 2}, {},
                  {"load_average": 1.5, "cpus": 2, "threads": 1, "others_cpus": 0.1}):
        assert fb.busy_reason({**meta, **quiet}) is None
        assert "Busy machine" not in fb.markdown({"meta": {**meta, **quiet}, "rows": [vars(r) for r in rows],
                                                  "targets": []})


def test_other_work_during_a_run_is_measured():
    """A process spinning on a CPU beside the run shows as about one CPU kept busy by others."""
    import subprocess
    import sys
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # (its start-up)
        before = fb.snapshot()
        time.sleep(1.0)
        load = fb.machine_load(before, fb.snapshot())
    finally:
        spinner.kill()
        spinner.wait()
    if "others_cpus" not in load:
        pytest.skip("no /proc/stat: the load averages stand in")
    assert load["others_cpus"] >= 0.6 and load["cpus"] >= 1 and load["threads"] == torch.get_num_threads()
    assert fb.busy_reason(load)
