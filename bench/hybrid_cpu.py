"""A hybrid VQ-VAE's loss on the CPU, side by side in one process (alternating rounds, minima): the fused
loss on the decoder's whole output (recon [B, K + c], target_gap), the same loss on a plain [B, K] target,
and the plain fix, which normalizes, masks and gathers recon's feature columns:

    python bench/hybrid_cpu.py

The layout is the motivating project's published one: 270 original columns, 143 kept (the INITIAL family's
14 first), 28 CNN-embedding columns after them (decoder input_dim 171). Forward+backward, norm "stats"
and "batch", milliseconds per step.
"""

import json
import time

import torch
import torch.nn.functional as F

import fusedvq

D, K, AT, C = 270, 143, 14, 28


def plain_fix(norm, mask, mean, std, cols):
    def fix(x, recon):
        if norm == "stats":
            z = ((x - mean) / std)[:, mask]
        else:
            kept = x[:, mask]
            s = kept.std(0)
            z = torch.nan_to_num((kept - kept.mean(0)) / torch.where(s < 1e-8, torch.ones_like(s), s))
        return F.mse_loss(z, recon[:, cols])

    return fix


def main() -> None:
    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:AT] = True
    mask[AT + torch.randperm(D - AT)[: K - AT]] = True
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    k = torch.arange(K)
    cols = torch.where(k < AT, k, k + C)
    results = {}
    for norm in ("stats", "batch"):
        stats = dict(mean=mean, std=std) if norm == "stats" else {}
        hybrid = fusedvq.MaskedMSELoss(mask, **stats, norm=norm, target_gap=(AT, C))
        plain = fusedvq.MaskedMSELoss(mask, **stats, norm=norm)
        fix = plain_fix(norm, mask, mean, std, cols)
        for B in (4, 1024, 65536):
            x = torch.randn(B, D).requires_grad_()
            wide, narrow = torch.randn(B, K + C).requires_grad_(), torch.randn(B, K).requires_grad_()
            reps = 300 if B == 4 else 40 if B == 1024 else 5
            best = {}
            for _ in range(4):
                for name, fn, r in (("hybrid", hybrid, wide), ("plain K", plain, narrow), ("plain fix", fix, wide)):
                    start = time.perf_counter()
                    for _ in range(reps):
                        x.grad = r.grad = None
                        fn(x, r).backward()
                    best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / reps * 1e3)
            row = {name: round(ms, 4) for name, ms in best.items()}
            row["plain fix / hybrid"] = round(best["plain fix"] / best["hybrid"], 2)
            results[f"{norm} B={B}"] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
