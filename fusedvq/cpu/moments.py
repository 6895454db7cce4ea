"""The moments of several parts merged into one: a batch's row blocks (cpu/batch.py) or the ranks' batches
(ops/distributed.py, sync_stats). Each part is (count, c, m, M2): its rows' count, the shift c (a row of
its own), the mean m around c and M2 = Σ (x̃ − c − m)²; cpu/batch.py's finalize_moments turns the
merged ones into the batch's statistics.
"""

from __future__ import annotations

import torch


def merge_moments(parts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, c, m, M2) over several parts [(count, c, m, M2), ...] (e.g. one per rank), merged in float64 with
    Chan's formula around the shift of the first part that has rows, so that a column constant over all
    parts still has m = M2 = 0 exactly; every caller given the same parts in the same order gets the same
    bits. Results in `dtype` (N as a 0-d tensor)."""
    wide = [(torch.as_tensor(n, dtype=torch.float64), c.double(), m.double(), m2.double()) for n, c, m, m2 in parts]
    counts = torch.stack([n for n, *_ in wide])
    N = counts.sum()
    has_rows = counts > 0
    first = has_rows.to(torch.int8).argmax()  # the first part with rows (0 if none has): no host sync
    shift = torch.stack([c for _, c, _, _ in wide])[first]
    means = torch.stack([(c - shift) + m for _, c, m, _ in wide])  # [P, K] around the common shift
    mean = (counts[:, None] * means).sum(0) / N.clamp_min(1)
    spread = torch.where(has_rows[:, None], counts[:, None] * (means - mean).square(), torch.zeros_like(means))
    m2 = torch.stack([m2 for *_, m2 in wide]).sum(0) + spread.sum(0)
    return N.to(dtype), shift.to(dtype), mean.to(dtype), m2.to(dtype)
