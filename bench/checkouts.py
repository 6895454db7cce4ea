"""A/B of two checkouts in one run: a measuring script's `--measure` mode, run in fresh interpreters with
each checkout's root on PYTHONPATH, alternating, round after round (a shared machine's noise then falls on
both alike). Used by ab_cpu_step.py and host_path.py."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run(description: str, script: str, measure):
    """The command line of an A/B script (--against OTHER_CHECKOUT, --rounds N): `alternate`'s rounds, or
    None after printing measure()'s JSON when called as the measuring child (--measure)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--against", help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return None
    return alternate(script, args.against, args.rounds)


def alternate(script: str, against, rounds: int) -> dict:
    """{label: [result of each round]} for this checkout ("new") and `against` ("old"), or this one alone
    ("this"); a result is what `script --measure` printed as JSON."""
    here = str(Path(script).resolve().parents[1])
    roots = {"new": here, "old": os.path.abspath(against)} if against else {"this": here}
    runs: dict = {label: [] for label in roots}
    for _ in range(rounds):
        for label, root in roots.items():
            done = subprocess.run([sys.executable, script, "--measure"], cwd=root, check=True, capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": root})
            runs[label].append(json.loads(done.stdout))
    return runs
