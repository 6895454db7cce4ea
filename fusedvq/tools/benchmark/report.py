"""Reports: environment, Markdown, the plot, the Results section of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from .cases import D, K, DTYPES, MODES, NORMS, PROVIDERS
from .load import busy_reason
from .runs import NOISY, NOISY_SPREAD, Row, compare, speed_words


# --------------------------------------------------------------------------------------------------- reports


def environment(device: str, copy_rate: Optional[float], command: str) -> dict:
    cpu = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "host_cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": copy_rate / 1e9 if copy_rate else None,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    return meta


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if v < 1000 else f"{v:,.0f}"


def _cell(row: Optional[Row]) -> str:
    """A cell: the median ms per step, then the fastest–slowest round when recorded."""
    if row is None or row.ms is None:
        return "–"
    if row.ms_min is None or row.ms_max is None:
        return _ms(row.ms)
    return f"{_ms(row.ms)} ({_ms(row.ms_min)}–{_ms(row.ms_max)})"


def _times(ms: Optional[float], spread: Optional[list]) -> str:
    return _ms(ms) + (f" ({_ms(spread[0])}–{_ms(spread[1])})" if ms is not None and spread else "")


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def ours_provider(device: str) -> str:
    return "fused" if device == "cuda" else "reference"


def _display_order(key: tuple[str, str, str]) -> list[int]:
    """Sort key of a (norm, dtype, mode) group: the order of NORMS, DTYPES and MODES."""
    return [seq.index(v) if v in seq else len(seq) for seq, v in zip((NORMS, DTYPES, MODES), key)]


def markdown(report: dict) -> str:
    meta, rows = report["meta"], [Row(**r) for r in report["rows"]]
    ours = ours_provider(meta["device"])
    providers = [p for p in PROVIDERS if any(r.provider == p for r in rows)]
    lines = [
        f"# fusedvq benchmark: {meta['device_name']}",
        "",
        f"`{meta['command']}` · {meta['date']} · torch {meta['torch']} · triton {meta['triton'] or '–'} · "
        f"D = {rows[0].D if rows else D}, K = {rows[0].K if rows else K}",
        "",
        "Milliseconds per step: the median over rounds (providers timed in turns), then the fastest–slowest "
        f"round. '{ours} vs eager' compares the medians: N× faster or N× slower. Where either cell's slowest "
        f"round took more than {NOISY_SPREAD:g}× its fastest, the machine was busy with other work and the "
        f"pair is not ranked: '{NOISY}'. Modes: forward, forward+backward (the loss "
        "alone: MaskedMSELoss against the plain fix), clean+mse (the VQ-led step's loss: FeatureCleaner and "
        "F.mse_loss(recon, z), forward+backward, against the plain fix normalizing once for both).",
    ]
    if meta.get("copy_bandwidth_gbps"):
        lines.append(f"Device copy bandwidth (read + write): {meta['copy_bandwidth_gbps']:.0f} GB/s.")
    if busy_reason(meta):
        lines += ["", f"**Busy machine:** {busy_reason(meta)}"]
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.norm, row.dtype, row.mode), []).append(row)
    for (norm, dtype, mode), group in sorted(groups.items(), key=lambda item: _display_order(item[0])):
        by = {(r.provider, r.B): r for r in group}
        unavailable = sorted({f"{r.provider} ({r.status})" for r in group if r.status != "ok"})
        lines += ["", f"## norm={norm}, {dtype}, {mode}", ""]
        head = ["B"] + providers + [f"{ours} vs eager", f"{ours} vs compiled", f"{ours} GB/s",
                                    f"saved for backward: {ours} / eager"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for B in sorted({r.B for r in group}):
            o, e, c = by.get((ours, B)), by.get(("eager", B)), by.get(("compiled", B))
            cells = [str(B)] + [_cell(by.get((p, B))) for p in providers]
            cells += [compare(o, e), compare(o, c)]
            gbps = f"{o.gbps:.1f}" if o and o.gbps else "–"
            if o and o.copy_fraction:
                gbps += f" ({o.copy_fraction:.0%} of copy)"
            if o and o.device_ms and o.device_copy_fraction is not None:
                gbps += (f"; kernels {o.device_ms:.3g} ms, {o.bytes / o.device_ms / 1e6:.0f} GB/s "
                         f"({o.device_copy_fraction:.0%} of copy)")
            cells.append(gbps)
            saved = f"{_bytes(o.saved_bytes) if o else '–'} / {_bytes(e.saved_bytes) if e else '–'}"
            if mode == "forward":
                saved = "–"
            cells.append(saved)
            lines.append("| " + " | ".join(cells) + " |")
        if unavailable:
            lines += ["", "Not run: " + "; ".join(unavailable) + "."]
    if any(r.peak_bytes is not None for r in rows):
        lines += ["", "## Peak CUDA memory of a step above the inputs (forward+backward)", "",
                  "| B | dtype | norm | " + " | ".join(providers) + " |", "|---|---|---|" + "---|" * len(providers)]
        keys = sorted({(r.B, r.dtype, r.norm) for r in rows if r.mode == "forward+backward"})
        for B, dtype, norm in keys:
            cells = [_bytes(next((r.peak_bytes for r in rows if (r.provider, r.B, r.dtype, r.norm, r.mode) ==
                                  (p, B, dtype, norm, "forward+backward")), None)) for p in providers]
            lines.append(f"| {B} | {dtype} | {norm} | " + " | ".join(cells) + " |")
    if report.get("targets"):
        lines += ["", "## Targets (forward+backward, float32, norm=stats)", "",
                  "| target | ms per step (ours / baseline) | measured | verdict |", "|---|---|---|---|"]
        for t in report["targets"]:
            m = t["measured"]
            shown = "–" if m is None else (f"{m:.0%}" if t["baseline"] == "copy" else speed_words(m))
            times = (f"{_times(t.get('ours_ms'), t.get('ours_range_ms'))} / "
                     f"{_times(t.get('baseline_ms'), t.get('baseline_range_ms'))}")
            verdict = t["verdict"] + (f" — {t['why']}" if t.get("why") else "")
            lines.append(f"| {t['target']} | {times} | {shown} | {verdict} |")
    return "\n".join(lines) + "\n"


# The plot's legend: which line is fusedvq and which a baseline.
LEGEND = {
    "fused": "fusedvq (Triton kernels)",
    "reference": "fusedvq (PyTorch path)",
    "eager": "baseline: the plain fix",
    "compiled": "baseline: torch.compile(plain fix)",
}


def plot(report: dict, path: Path) -> None:
    """Time per step against B, log–log, one line per provider; one panel per (norm, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = report["meta"], [Row(**r) for r in report["rows"]]
    panels = sorted({(r.norm, r.dtype, r.mode) for r in rows if r.ms}, key=_display_order)  # measured ones
    cols = min(2, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols) if panels else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, (norm, dtype, mode) in zip(axes.flat, panels):
        for provider in PROVIDERS:
            pts = sorted((r.B, r.ms, r.ms_min, r.ms_max) for r in rows if (r.provider, r.norm, r.dtype, r.mode) ==
                         (provider, norm, dtype, mode) and r.ms)
            if pts:
                baseline = provider in ("eager", "compiled")
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                label=LEGEND.get(provider, provider), linestyle="--" if baseline else "-",
                                linewidth=1.2 if baseline else 2.2)
                spread = [p for p in pts if p[2] and p[3]]  # the fastest–slowest round, shaded
                if spread:
                    ax.fill_between([p[0] for p in spread], [p[2] for p in spread], [p[3] for p in spread],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        sizes = sorted({r.B for r in rows})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("ms per step (lower is better)")
        ax.set_title(f"norm={norm}, {dtype}, {mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fusedvq loss, time per step (median; shaded: fastest–slowest round): {meta['device_name']}, "
                 f"torch {meta['torch']}\n{meta['command']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if nrows > 1 else 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in out (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def results_section(reports: list[dict], folders: list[str]) -> str:
    """The "Results" section of docs/benchmarks.md from reports (one per device): for each, the device, the
    command that produced it, the headline tables (norm="stats", float32, forward+backward; the VQ-led
    step, clean+mse, float32), the targets and the plot; folders[i] is where report i's bench.md and
    bench.png live, relative to the page."""
    lines = ["## Results", ""]
    for report, folder in zip(reports, folders):
        meta = report["meta"]
        md = markdown(report).splitlines()
        lines += [f"### {meta['device_name']}", "",
                  f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, triton {meta['triton'] or '–'}"
                  + (f", copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s" if meta.get("copy_bandwidth_gbps")
                     else "") + f". Every table: [{folder}/bench.md]({folder}/bench.md).", ""]
        for title in ("## norm=stats, float32, forward+backward", "## norm=batch, float32, clean+mse",
                      "## norm=stats, float32, clean+mse", "## Targets"):
            start = next((i for i, line in enumerate(md) if line.startswith(title)), None)
            if start is None:
                continue
            end = next((i for i in range(start + 1, len(md)) if md[i].startswith("## ")), len(md))
            lines += ["#### " + md[start][3:]] + md[start + 1 : end]
        lines += ["", f"![ms per step against B on {meta['device_name']}, from `{meta['command']}`]"
                      f"({folder}/bench.png)", ""]
    return "\n".join(lines) + "\n"
