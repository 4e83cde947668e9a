#!/usr/bin/env python3
"""What a PyTorch user writes for per-sample gradient squares, timed on the same GPU as
our kernels, the card's measured ceilings, and the table that sets the two side by side.

For a product C_n = G_n^T X_n (X: B x T x d_in, G: B x T x d_out):
S[n] = ||C_n||^2 and F = sum_n C_n^2 (d_out x d_in). Paths timed:
  bmm fp32     torch.bmm + square + sums, tf32 off
  bmm tf32     the same with torch.backends.cuda.matmul.allow_tf32 = True
  vmap(grad)   torch.func.vmap(torch.func.grad(loss)) of the per-sample loss, tf32 off
  ghost        S only, from Gram matrices: sum (X X^T) * (G G^T) (no F), tf32 off
For a whole LoRA site (products u = x A^T and delta B handed in, as in fed-sim):
grad_A = (scale * deltaB)^T X and grad_B = delta^T (scale * u), both squared and summed.

Ceilings measured in the same run: fp32 and tf32 GEMM rates (8192^3) and the
device-to-device copy bandwidth (bytes read + written). The floor of a row is the larger
of its FLOPs at the GEMM rate and its minimum bytes (inputs once, outputs once) at the
copy bandwidth (ANCHORS.md's definition).

Timing: triton.testing.do_bench median (it clears the L2 before each run; our binary
flushes the L2 the same way), or CUDA events with an L2 flush when triton is missing.
Every path is checked against float64 on a cut of the shape first.

  python3 pytorch_squares.py measure --out torch.json [--quick]
  python3 pytorch_squares.py table ours.json torch.json
  python3 pytorch_squares.py selftest          # CPU only: the paths agree with float64
"""

import argparse
import json
import math
import sys

# (B, T, d_in, d_out): ANCHORS.md's six shapes (d_out = r for a LoRA A factor), then
# ranks 16 and 64 at the same widths. Same list as kernels/src/bin/gpu-bench.rs.
PRODUCTS = [
    (64, 128, 384, 384),
    (64, 128, 384, 8),
    (32, 128, 768, 768),
    (32, 128, 768, 8),
    (8, 256, 4096, 4096),
    (8, 256, 4096, 16),
    (64, 128, 384, 16),
    (64, 128, 384, 64),
    (32, 128, 768, 16),
    (32, 128, 768, 64),
    (8, 256, 4096, 64),
]

# (B, T, d_in, d_out, r): whole LoRA sites, as in gpu-bench.rs.
SITES = [
    (64, 128, 384, 384, 8),
    (64, 128, 384, 384, 16),
    (64, 128, 384, 384, 64),
    (32, 128, 768, 768, 8),
    (32, 128, 768, 768, 16),
    (32, 128, 768, 768, 64),
    (8, 256, 4096, 4096, 16),
    (8, 256, 4096, 4096, 64),
]

SCALE = 2.0
FP32_TOL = 1e-5
TF32_TOL = 2e-3


def product_paths(torch, X, G):
    """name -> (tf32 on?, fn returning (S, F or None))."""
    d_out, d_in = G.shape[2], X.shape[2]

    def bmm():
        c2 = torch.bmm(G.transpose(1, 2), X).square()
        return c2.sum(dim=(1, 2)), c2.sum(dim=0)

    W = torch.zeros(d_out, d_in, device=X.device, dtype=X.dtype)

    def loss(w, x, g):
        # d/dw of sum(g * (x w^T)) is g^T x: the sample's gradient of a linear layer.
        return (g * (x @ w.T)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

    def vmap_grad():
        c2 = per_sample(W, X, G).square()
        return c2.sum(dim=(1, 2)), c2.sum(dim=0)

    def ghost():
        gx = torch.bmm(X, X.transpose(1, 2))
        gg = torch.bmm(G, G.transpose(1, 2))
        return (gx * gg).sum(dim=(1, 2)), None

    return {
        "bmm_fp32": (False, bmm),
        "bmm_tf32": (True, bmm),
        "vmap_grad_fp32": (False, vmap_grad),
        "ghost_fp32": (False, ghost),
    }


def site_paths(torch, X, D, U, DB, scale):
    """name -> (tf32 on?, fn returning ((S_A, S_B), (F_A, F_B)))."""

    def bmm():
        ga = torch.bmm((scale * DB).transpose(1, 2), X).square()
        gb = torch.bmm(D.transpose(1, 2), scale * U).square()
        return (ga.sum(dim=(1, 2)), gb.sum(dim=(1, 2))), (ga.sum(dim=0), gb.sum(dim=0))

    return {"bmm_fp32": (False, bmm), "bmm_tf32": (True, bmm)}


def rel_err(got, want):
    if got is None:
        return 0.0
    got = got.double()
    diff = (got - want).norm().item()
    norm = want.norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def check_product(torch, X, G, paths):
    """Relative error of each path against float64 on the same (cut) inputs."""
    c = torch.bmm(G.double().transpose(1, 2), X.double()).square()
    want_s, want_f = c.sum(dim=(1, 2)), c.sum(dim=0)
    errs = {}
    for name, (tf32, fn) in paths.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        s, f = fn()
        errs[name] = max(rel_err(s, want_s), rel_err(f, want_f))
    torch.backends.cuda.matmul.allow_tf32 = False
    return errs


def check_site(torch, X, D, U, DB, scale, paths):
    ga = torch.bmm((scale * DB.double()).transpose(1, 2), X.double()).square()
    gb = torch.bmm(D.double().transpose(1, 2), scale * U.double()).square()
    want = [ga.sum(dim=(1, 2)), gb.sum(dim=(1, 2)), ga.sum(dim=0), gb.sum(dim=0)]
    errs = {}
    for name, (tf32, fn) in paths.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        (sa, sb), (fa, fb) = fn()
        errs[name] = max(rel_err(g, w) for g, w in zip([sa, sb, fa, fb], want))
    torch.backends.cuda.matmul.allow_tf32 = False
    return errs


def timer(torch, quick):
    """A function (fn, tf32) -> median microseconds."""
    reps_ms = 20 if quick else 100
    try:
        from triton.testing import do_bench

        def time_us(fn, tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = do_bench(fn, warmup=max(5, reps_ms // 4), rep=reps_ms, return_mode="median")
            torch.backends.cuda.matmul.allow_tf32 = False
            return ms * 1e3

        return time_us, "triton.testing.do_bench median (L2 cleared before each run)"
    except ImportError:
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        n = 10 if quick else 100

        def time_us(fn, tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for _ in range(5):
                fn()
            times = []
            for _ in range(n):
                flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            torch.backends.cuda.matmul.allow_tf32 = False
            times.sort()
            return times[len(times) // 2]

        return time_us, "CUDA events median, L2 flushed before each run"


def ceilings(torch, time_us):
    n = 8192
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    flops = 2.0 * n ** 3
    fp32 = flops / (time_us(lambda: a @ b, False) * 1e-6)
    tf32 = flops / (time_us(lambda: a @ b, True) * 1e-6)
    del a, b
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB: far past the L2
    y = torch.empty_like(x)
    copy = 2.0 * x.numel() * 4 / (time_us(lambda: y.copy_(x), False) * 1e-6)
    del x, y
    return {"fp32_flops": fp32, "tf32_flops": tf32, "copy_bytes_per_s": copy}


def measure(args):
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: PyTorch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1234)
    time_us, how = timer(torch, args.quick)
    rand = lambda *shape: torch.rand(*shape, device="cuda", generator=gen) * 2 - 1  # noqa: E731
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timing": how,
        "ceilings": ceilings(torch, time_us),
        "rows": [],
    }
    print(f"PyTorch {torch.__version__} on {out['device']}; {how}", file=sys.stderr)
    c = out["ceilings"]
    print(
        f"ceilings: fp32 GEMM {c['fp32_flops'] / 1e12:.1f} TFLOP/s, tf32 GEMM "
        f"{c['tf32_flops'] / 1e12:.1f} TFLOP/s, copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s",
        file=sys.stderr,
    )
    for b, t, d_in, d_out in PRODUCTS:
        bc, tc = min(b, 2), min(t, 32)
        Xc, Gc = rand(bc, tc, d_in), rand(bc, tc, d_out)
        errs = check_product(torch, Xc, Gc, product_paths(torch, Xc, Gc))
        X, G = rand(b, t, d_in), rand(b, t, d_out)
        paths = product_paths(torch, X, G)
        row = {"kind": "product", "shape": [b, t, d_in, d_out], "paths": {}}
        for name, (tf32, fn) in paths.items():
            try:
                us = time_us(fn, tf32)
            except torch.OutOfMemoryError:
                us = None
            row["paths"][name] = {"median_us": us, "rel_err": errs[name]}
            torch.cuda.empty_cache()
        out["rows"].append(row)
        print(f"product {row['shape']}: " + ", ".join(
            f"{k} {v['median_us']:.1f} us" if v["median_us"] else f"{k} OOM"
            for k, v in row["paths"].items()), file=sys.stderr)
        del X, G, paths
    for b, t, d_in, d_out, r in SITES:
        bc, tc = min(b, 2), min(t, 32)
        small = [rand(bc, tc, d) for d in (d_in, d_out, r, r)]
        errs = check_site(torch, *small, SCALE, site_paths(torch, *small, SCALE))
        X, D, U, DB = rand(b, t, d_in), rand(b, t, d_out), rand(b, t, r), rand(b, t, r)
        row = {"kind": "lora_site", "shape": [b, t, d_in, d_out, r], "paths": {}}
        for name, (tf32, fn) in site_paths(torch, X, D, U, DB, SCALE).items():
            row["paths"][name] = {"median_us": time_us(fn, tf32), "rel_err": errs[name]}
        out["rows"].append(row)
        print(f"lora_site {row['shape']}: " + ", ".join(
            f"{k} {v['median_us']:.1f} us" for k, v in row["paths"].items()), file=sys.stderr)
        del X, D, U, DB
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


def work(kind, shape):
    """(FLOPs, minimum bytes) of a row: inputs read once, outputs written once, fp32."""
    if kind == "product":
        b, t, d_in, d_out = shape
        return 2.0 * b * t * d_in * d_out, 4.0 * (b * t * (d_in + d_out) + d_in * d_out + b)
    b, t, d_in, d_out, r = shape
    flops = 2.0 * b * t * r * (d_in + d_out)
    return flops, 4.0 * (b * t * (d_in + d_out + 2 * r) + r * (d_in + d_out) + 2 * b)


def fmt(v, digits=1):
    return "-" if v is None or not math.isfinite(v) else f"{v:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def our_check_passed(o):
    """Our row's checks: the cut shape against the f64 reference and the timed run
    against the Gram identity (gpu-bench writes null for a non-finite error and
    "check": "failed" for any failure)."""
    tol = TF32_TOL if o["mode"] == "tf32" else FP32_TOL
    errs = [o.get("rel_err"), o.get("timed_err", 0.0)]
    return o.get("check", "ok") == "ok" and all(e is not None and e <= tol for e in errs)


def fmt_err(e):
    return "not finite" if e is None else f"{e:.2e}"


def max_err(errs):
    if not errs:
        return "-"
    if any(e is None for e in errs):
        return "not finite"
    return f"{max(errs):.1e}"


def table(args):
    with open(args.ours) as f:
        ours = json.load(f)
    with open(args.torch) as f:
        theirs = json.load(f)
    c = theirs["ceilings"]
    lines = [
        f"GPU: {ours['device']} (ours) / {theirs['device']} (PyTorch {theirs['torch']}).",
        f"Ceilings measured in this run: fp32 GEMM {c['fp32_flops'] / 1e12:.1f} TFLOP/s, "
        f"tf32 GEMM {c['tf32_flops'] / 1e12:.1f} TFLOP/s, copy {c['copy_bytes_per_s'] / 1e9:,.0f} GB/s.",
        f"Ours: {ours['timing']}; PyTorch: {theirs['timing']}. Times are medians in µs.",
        f"Our kernels: NVRTC {ours.get('nvrtc', '?')}, driver CUDA {ours.get('driver', '?')}, "
        f"loaded as {ours.get('binary', '?')}, resident blocks per SM (m8, m16, m64, tf32) "
        f"{ours.get('occupancy', '?')}.",
        "floor = max(FLOPs / GEMM rate, bytes / copy bandwidth); best fp32 = the faster of "
        "PyTorch's bmm and vmap(grad) in fp32 (ghost gives S only, no F).",
        "",
        "| kind | shape | ours fp32 | ours tf32 | bmm fp32 | bmm tf32 | vmap(grad) | ghost (S) "
        "| ours fp32 / best torch fp32 | ours tf32 / bmm tf32 | fp32 floor | ours fp32 / floor "
        "| tf32 floor | ours tf32 / tf32 floor | max rel err (ours) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mine = {}
    for r in ours["rows"]:
        mine[(r["kind"], tuple(r["shape"]), r["mode"])] = r
    bad = []
    for row in theirs["rows"]:
        kind, shape = row["kind"], tuple(row["shape"])
        p = {k: v["median_us"] for k, v in row["paths"].items()}
        for name, v in row["paths"].items():
            tol = TF32_TOL if "tf32" in name else FP32_TOL
            if not v["rel_err"] <= tol:
                bad.append(f"PyTorch {name} at {kind} {list(shape)}: rel err {v['rel_err']:.2e}")
        o32 = mine.get((kind, shape, "fp32"))
        o_tf = mine.get((kind, shape, "tf32"))
        for o in (o32, o_tf):
            if o is not None and not our_check_passed(o):
                bad.append(
                    f"ours {o['mode']} at {kind} {list(shape)}: rel err {fmt_err(o.get('rel_err'))}, "
                    f"timed run {fmt_err(o.get('timed_err'))}, "
                    f"timed runs differing from the first: {o.get('runs_differing', 0)}"
                    + (f", error: {o['error']}" if o.get("error") else "")
                )
        us32 = o32["median_us"] if o32 else None
        us_tf = o_tf["median_us"] if o_tf else None
        fp32_paths = [p.get("bmm_fp32"), p.get("vmap_grad_fp32")]
        best = min((v for v in fp32_paths if v), default=None)
        flops, nbytes = work(kind, shape)
        floor32 = max(flops / c["fp32_flops"], nbytes / c["copy_bytes_per_s"]) * 1e6
        floor_tf = max(flops / c["tf32_flops"], nbytes / c["copy_bytes_per_s"]) * 1e6
        # timed_err is absent from JSON written before gpu-bench checked its timed runs.
        errs = [
            o[key]
            for o in (o32, o_tf)
            if o is not None
            for key in ("rel_err", "timed_err")
            if key in o
        ]
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                kind,
                "×".join(str(s) for s in shape),
                fmt(us32),
                fmt(us_tf),
                fmt(p.get("bmm_fp32")),
                fmt(p.get("bmm_tf32")),
                fmt(p.get("vmap_grad_fp32")),
                fmt(p.get("ghost_fp32")),
                fmt(ratio(us32, best), 2),
                fmt(ratio(us_tf, p.get("bmm_tf32")), 2),
                fmt(floor32),
                fmt(ratio(us32, floor32), 2),
                fmt(floor_tf),
                fmt(ratio(us_tf, floor_tf), 2),
                max_err(errs),
            )
        )
    # Our rows without a PyTorch row were not in the table: their checks still count.
    theirs_keys = {(r["kind"], tuple(r["shape"])) for r in theirs["rows"]}
    for (kind, shape, mode), o in mine.items():
        if (kind, shape) not in theirs_keys and not our_check_passed(o):
            bad.append(f"ours {mode} at {kind} {list(shape)} (no PyTorch row): check failed")
    if bad:
        lines += ["", "CORRECTNESS FAILURES (their timings mean nothing):"] + bad
    print("\n".join(lines))
    return 1 if bad else 0


def selftest(_args):
    """CPU only: every path computes the same S and F as a float64 loop, and the table
    renders from made-up JSON. Exercises the code that needs no GPU."""
    import tempfile
    import os
    import torch

    torch.manual_seed(0)
    b, t, d_in, d_out = 3, 5, 7, 4
    X, G = torch.rand(b, t, d_in) * 2 - 1, torch.rand(b, t, d_out) * 2 - 1
    want_s = torch.zeros(b, dtype=torch.float64)
    want_f = torch.zeros(d_out, d_in, dtype=torch.float64)
    for n in range(b):
        c = torch.zeros(d_out, d_in, dtype=torch.float64)
        for i in range(t):
            c += torch.outer(G[n, i].double(), X[n, i].double())
        want_s[n] = (c * c).sum()
        want_f += c * c
    for name, (_, fn) in product_paths(torch, X, G).items():
        s, f = fn()
        assert rel_err(s, want_s) < 1e-5, (name, "S")
        assert f is None or rel_err(f, want_f) < 1e-5, (name, "F")
    errs = check_product(torch, X, G, product_paths(torch, X, G))
    assert max(errs.values()) < 1e-5, errs
    r = 3
    D, U, DB = torch.rand(b, t, d_out), torch.rand(b, t, r), torch.rand(b, t, r)
    errs = check_site(torch, X, D, U, DB, SCALE, site_paths(torch, X, D, U, DB, SCALE))
    assert max(errs.values()) < 1e-5, errs
    assert work("product", (64, 128, 384, 8))[1] == 4.0 * (64 * 128 * 392 + 384 * 8 + 64)
    with tempfile.TemporaryDirectory() as d:
        ours = {"device": "test", "timing": "made up", "rows": [
            {"kind": "product", "shape": [64, 128, 384, 8], "mode": "fp32",
             "median_us": 10.0, "rel_err": 1e-7}]}
        theirs = {"device": "test", "torch": torch.__version__, "timing": "made up",
                  "ceilings": {"fp32_flops": 51.7e12, "tf32_flops": 379e12,
                               "copy_bytes_per_s": 2994e9},
                  "rows": [{"kind": "product", "shape": [64, 128, 384, 8], "paths": {
                      "bmm_fp32": {"median_us": 32.0, "rel_err": 1e-7},
                      "bmm_tf32": {"median_us": 32.0, "rel_err": 1e-4},
                      "vmap_grad_fp32": {"median_us": 628.0, "rel_err": 1e-7},
                      "ghost_fp32": {"median_us": 48.0, "rel_err": 1e-7}}}]}
        po, pt = os.path.join(d, "o.json"), os.path.join(d, "t.json")
        for path, obj in ((po, ours), (pt, theirs)):
            with open(path, "w") as f:
                json.dump(obj, f)
        assert table(argparse.Namespace(ours=po, torch=pt)) == 0
        ours["rows"][0]["timed_err"] = 2e-7
        with open(po, "w") as f:
            json.dump(ours, f)
        assert table(argparse.Namespace(ours=po, torch=pt)) == 0
        # A failed check (a non-finite error is null in gpu-bench's JSON) is flagged,
        # not a crash.
        ours["rows"][0].update({"rel_err": None, "timed_err": 3e-2, "check": "failed"})
        with open(po, "w") as f:
            json.dump(ours, f)
        assert table(argparse.Namespace(ours=po, torch=pt)) == 1
    print("selftest: ok (CPU paths agree with float64; the table renders and flags failures)")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time PyTorch's paths and the ceilings on the GPU")
    m.add_argument("--out")
    m.add_argument("--quick", action="store_true")
    t = sub.add_parser("table", help="ours.json + torch.json -> markdown table")
    t.add_argument("ours")
    t.add_argument("torch")
    sub.add_parser("selftest", help="CPU-only checks of the paths and the table")
    args = parser.parse_args()
    code = {"measure": measure, "table": table, "selftest": selftest}[args.command](args)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
