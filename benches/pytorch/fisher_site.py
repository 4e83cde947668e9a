#!/usr/bin/env python3
"""What a PyTorch user writes for per-sample LoRA gradient squares on the CPU, at the shapes
of the `fisher` bench (benches/benches/fisher.rs): batch 16, the last quarter of each
sequence padding, MiniLM (H = 384) and BERT-base (H = 768), the query (H -> H) and
intermediate (H -> 4H) sites, r in {8, 16}, T in {32, 128}.

    gA = bmm(Vᵀ, X), gB = scale·bmm(Δᵀ, U)   (B×r×d_in and B×d_out×r, materialised)
    per-sample squares = gA², gB² summed per sample; diagonals = summed over samples

with X, Δ masked, U = X·Aᵀ, V = scale·Δ·B, all fp32, 2 threads. Prints a table to put beside
`cargo xtask bench --only fisher`'s (run them back to back on the same machine and compare
ratios). Usage:

    /work/venv/bin/python benches/pytorch/fisher_site.py [--threads 2]
"""

import argparse
import statistics
import time

import torch

BATCH = 16


def case(d_in, d_out, r, t, gen):
    x = torch.rand(BATCH, t, d_in, generator=gen) * 2 - 1
    delta = torch.rand(BATCH, t, d_out, generator=gen) * 2 - 1
    a = torch.rand(r, d_in, generator=gen) * 2 - 1
    b = torch.rand(d_out, r, generator=gen) * 2 - 1
    mask = torch.zeros(BATCH, t, 1)
    mask[:, : t * 3 // 4] = 1.0
    return x, delta, mask, a, b


def squares(x, delta, mask, a, b, scale=2.0):
    xm, dm = x * mask, delta * mask
    u = xm @ a.T
    v = (dm @ b) * scale
    ga = torch.bmm(v.transpose(1, 2), xm)
    gb = torch.bmm(dm.transpose(1, 2), u) * scale
    ga2, gb2 = ga.square(), gb.square()
    return ga2.sum((1, 2)), gb2.sum((1, 2)), ga2.sum(0), gb2.sum(0)


def median_ms(f, reps=7):
    f()
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        f()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, median of 7")
    print("| shape | site | r | T | torch bmm + square + sum |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for shape, h in [("MiniLM", 384), ("BERT-base", 768)]:
            for site, d_out in [("query", h), ("intermediate", 4 * h)]:
                for r in [8, 16]:
                    for t in [32, 128]:
                        c = case(h, d_out, r, t, gen)
                        ms = median_ms(lambda: squares(*c))
                        print(f"| {shape} | {site} {h}→{d_out} | {r} | {t} | {ms:.2f} ms |")


if __name__ == "__main__":
    main()
