"""Time the launch shapes of the fused kernels on a GPU: how kernels/tiles.py's TUNING was chosen.

    python bench/tune_kernels.py [--sizes 65536,262144]

For each batch size (float32, D = 187, K = 171, norm="stats", reduction="mean") it times the forward
kernel over tile size × programs per SM × elements per warp, and the backward kernel over tile size ×
elements per warp, with triton.testing.do_bench (device time, median; L2 flushed between runs), and prints
each configuration's time and bandwidth for the bytes the design must move (fusedvq.tools.benchmark's byte
model), best first. Device time only: the host's launch overhead is what bench/profile_step.py shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from fusedvq.tools import benchmark as fb
from fusedvq.arguments import build_column_map
from fusedvq.kernels import launchers as mm
from fusedvq.kernels.plan import Mode
from fusedvq.kernels import tiles as settings

WALK_TILES = (2048, 4096, 8192)
PROGRAMS_PER_SM = (4, 8, 16, 64)
BACKWARD_TILES = (1024, 2048, 4096, 8192)
ELEMENTS_PER_WARP = (128, 256)


def _bytes(B: int) -> tuple[int, int]:
    """(forward, backward) bytes of the design's byte model at float32."""
    case = fb.Case(B, "float32", "stats", "forward")
    forward = fb.bytes_moved(case)
    return forward, fb.bytes_moved(dataclasses.replace(case, mode="forward+backward")) - forward


def _set(default: settings.Tuning, **fields) -> None:
    """TUNING (read by every launcher at each launch) = default with these fields changed, in place."""
    for field, value in dataclasses.asdict(dataclasses.replace(default, **fields)).items():
        setattr(settings.TUNING, field, value)


def main(argv=None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[65536, 262144])
    args = parser.parse_args(argv)
    default = dataclasses.replace(settings.TUNING)
    print(f"defaults: {default}")
    copy = fb.copy_bandwidth("cuda", nbytes=1 << 30)
    print(f"copy bandwidth (read + write): {copy / 1e9:.0f} GB/s")
    for B in args.sizes:
        inputs = fb.make_inputs(fb.Case(B, "float32", "stats", "forward"), "cuda")
        x, r = inputs.x.detach(), inputs.r.detach()
        index = inputs.mask.nonzero().squeeze(1)
        columns = build_column_map(index, x.shape[1])
        shift = inputs.mean[index].float().contiguous()
        scale = (1.0 / inputs.std[index]).float().contiguous()
        grad = torch.tensor(1.0, device="cuda")
        fwd_bytes, bwd_bytes = _bytes(B)
        rows = []
        for tile, programs, per_warp in itertools.product(WALK_TILES, PROGRAMS_PER_SM, ELEMENTS_PER_WARP):
            _set(default, walk_tile=tile, programs_per_sm=programs, elements_per_warp=per_warp)
            ms = triton.testing.do_bench(lambda: mm.masked_mse_forward(x, r, index, (shift, scale), Mode()),
                                         warmup=5, rep=25)
            rows.append((ms, f"forward  walk_tile={tile} programs_per_sm={programs} elements_per_warp={per_warp}",
                         fwd_bytes))
        for tile, per_warp in itertools.product(BACKWARD_TILES, ELEMENTS_PER_WARP):
            _set(default, backward_tile=tile, elements_per_warp=per_warp)
            ms = triton.testing.do_bench(
                lambda: mm.masked_mse_backward(grad, x, r, (columns.inv_ptr, columns.inv_k), (shift, scale), Mode()),
                warmup=5, rep=25)
            rows.append((ms, f"backward backward_tile={tile} elements_per_warp={per_warp}", bwd_bytes))
        _set(default)
        print(f"\n## B = {B}: µs, GB/s for the design's bytes, fraction of copy bandwidth (best first)\n")
        for kind in ("forward", "backward"):
            for ms, name, nbytes in sorted(row for row in rows if row[1].startswith(kind)):
                rate = nbytes / (ms * 1e-3)
                print(f"{ms * 1e3:8.1f} µs  {rate / 1e9:7.0f} GB/s  {rate / copy:5.0%}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
