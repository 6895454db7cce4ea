"""What the bounded read costs: a checkpoint in the motivating project's format (hybrid, its own statistics
records, PosixPaths, optimizer state) read in-process as before (inert._inert_load: the same scan and
weights-only load, unbounded) and in the bounded child (read_checkpoint), alternating, medians.

    python bench/loader_overhead.py [--weights-mb 1 16 64] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckpt_factory import make_run, write_checkpoint  # noqa: E402

from fusedvq.checkpoint import load_feature_spec, read_checkpoint  # noqa: E402
from fusedvq.checkpoint.inert import _inert_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-mb", type=float, nargs="+", default=[0, 4, 64])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print("| weights | file | in-process (before) | bounded child | overhead | load_feature_spec |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.weights_mb:
            folder = Path(tmp) / f"w{mb}"
            extra = {"vqvae.extra.weight": torch.randn(int(mb * (1 << 18)))}
            path = write_checkpoint(folder, make_run(hybrid=True, seed=1),
                             edit=lambda ck: ck["model_state_dict"].update(extra))
            times = {"before": [], "bounded": [], "spec": []}
            for _ in range(args.rounds):
                for key, call in (("before", lambda: _inert_load(path)), ("bounded", lambda: read_checkpoint(path)),
                                  ("spec", lambda: load_feature_spec(path))):
                    start = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - start)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            size = path.stat().st_size / (1 << 20)
            print(f"| {mb:g} MiB | {size:.1f} MiB | {med['before']:.1f} ms | {med['bounded']:.1f} ms | "
                  f"{med['bounded'] - med['before']:+.1f} ms ({med['bounded'] / med['before']:.2f}×) | "
                  f"{med['spec']:.1f} ms |")


if __name__ == "__main__":
    main()
