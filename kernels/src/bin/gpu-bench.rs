//! `gpu-bench`: times the kernels at the reference shapes on the GPU machine and writes
//! JSON for `kernels/bench/pytorch_squares.py table`. Built and packaged by
//! `cargo xtask gpu-bench`; run there by `run.sh`.
//!
//! Per shape and mode: first a correctness check against the f64 reference on a cut of
//! the shape (same widths, batch ≤ 2 and T ≤ 32, where the f64 loops stay fast) with
//! outputs poisoned; then warm-up runs and `--reps` timed runs of the whole site (sample
//! lengths, the square kernels, the fixed-order reductions), each preceded by an L2
//! flush and timed by CUDA events around it, as triton's do_bench does for PyTorch.
//! Inputs are random, never zeros.
//!
//! ```text
//! gpu-bench [--out FILE.json] [--reps N] [--quick]
//! ```

use std::fmt::Write as _;
use std::process::ExitCode;

use fibecfed_kernels::reference::{self, DenseData, LoraData, MaskKind, SplitMix64, rel_error};
use fibecfed_kernels::{DenseShape, GpuFisher, KernelError, LoraShape, Mode};

/// ANCHORS.md's six shapes (B, T, d_in, d_out; d_out = r for a LoRA A factor) plus the
/// LoRA ranks 16 and 64 at the same widths.
const PRODUCTS: [(usize, usize, usize, usize); 11] = [
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
];

/// Whole LoRA sites (both factors, x·Aᵀ and δ·B handed in as the encoder does):
/// (B, T, d_in, d_out, r).
const SITES: [(usize, usize, usize, usize, usize); 8] = [
    (64, 128, 384, 384, 8),
    (64, 128, 384, 384, 16),
    (64, 128, 384, 384, 64),
    (32, 128, 768, 768, 8),
    (32, 128, 768, 768, 16),
    (32, 128, 768, 768, 64),
    (8, 256, 4096, 4096, 16),
    (8, 256, 4096, 4096, 64),
];

const FP32_TOL: f64 = 1e-5;
const TF32_TOL: f64 = 2e-3;

struct Options {
    out: Option<String>,
    reps: usize,
    warmup: usize,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        out: None,
        reps: 100,
        warmup: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => o.out = Some(args.next().ok_or("--out needs a file")?),
            "--reps" => {
                o.reps = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--reps needs a positive whole number")?;
            }
            "--quick" => {
                o.reps = 10;
                o.warmup = 2;
            }
            other => return Err(format!("unknown argument {other:?}; see the file's doc")),
        }
    }
    Ok(o)
}

/// Median, 10th and 90th percentile.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

struct Row {
    kind: &'static str,
    shape: Vec<usize>,
    mode: Mode,
    rel_err: f64,
    times: (f64, f64, f64),
}

fn tol(mode: Mode) -> f64 {
    match mode {
        Mode::Fp32 => FP32_TOL,
        Mode::Tf32 => TF32_TOL,
    }
}

fn time_reps(
    gpu: &GpuFisher,
    o: &Options,
    mut run: impl FnMut() -> Result<(), KernelError>,
) -> Result<(f64, f64, f64), KernelError> {
    for _ in 0..o.warmup {
        run()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(o.reps);
    for _ in 0..o.reps {
        gpu.flush_l2()?;
        times.push(gpu.time_us(&mut run)?);
    }
    Ok(summary(times))
}

fn product_row(
    gpu: &GpuFisher,
    o: &Options,
    rng: &mut SplitMix64,
    (b, t, d_in, d_out): (usize, usize, usize, usize),
    mode: Mode,
) -> Result<Row, KernelError> {
    let cut = DenseShape {
        batch: b.min(2),
        seq_len: t.min(32),
        d_in,
        d_out,
    };
    let small = DenseData::random(cut, MaskKind::Full, rng);
    let want = reference::dense_site(&small.inputs())?;
    let mut job = gpu.dense_job(&small.inputs())?;
    gpu.poison_dense(&mut job)?;
    gpu.run_dense(&mut job, mode)?;
    let got = gpu.read_dense(&job)?;
    let rel_err = rel_error(&got.sq, &want.sq).max(rel_error(&got.diag, &want.diag));

    let shape = DenseShape {
        batch: b,
        seq_len: t,
        d_in,
        d_out,
    };
    let data = DenseData::random(shape, MaskKind::Full, rng);
    let mut job = gpu.dense_job(&data.inputs())?;
    let times = time_reps(gpu, o, || gpu.run_dense(&mut job, mode))?;
    Ok(Row {
        kind: "product",
        shape: vec![b, t, d_in, d_out],
        mode,
        rel_err,
        times,
    })
}

fn site_row(
    gpu: &GpuFisher,
    o: &Options,
    rng: &mut SplitMix64,
    (b, t, d_in, d_out, r): (usize, usize, usize, usize, usize),
    mode: Mode,
) -> Result<Row, KernelError> {
    let cut = LoraShape {
        batch: b.min(2),
        seq_len: t.min(32),
        d_in,
        d_out,
        rank: r,
    };
    let small = LoraData::random(cut, MaskKind::Full, rng);
    let want = reference::lora_site(&small.inputs(true))?;
    let mut job = gpu.lora_job(&small.inputs(true))?;
    gpu.poison_lora(&mut job)?;
    gpu.run_lora(&mut job, mode)?;
    let got = gpu.read_lora(&job)?;
    let rel_err = [
        rel_error(&got.sq_a, &want.sq_a),
        rel_error(&got.sq_b, &want.sq_b),
        rel_error(&got.diag_a, &want.diag_a),
        rel_error(&got.diag_b, &want.diag_b),
    ]
    .into_iter()
    .fold(0.0, f64::max);

    let shape = LoraShape {
        batch: b,
        seq_len: t,
        d_in,
        d_out,
        rank: r,
    };
    let data = LoraData::random(shape, MaskKind::Full, rng);
    let mut job = gpu.lora_job(&data.inputs(true))?;
    let times = time_reps(gpu, o, || gpu.run_lora(&mut job, mode))?;
    Ok(Row {
        kind: "lora_site",
        shape: vec![b, t, d_in, d_out, r],
        mode,
        rel_err,
        times,
    })
}

fn json(gpu: &GpuFisher, rows: &[Row], reps: usize) -> String {
    let mut s = String::new();
    let (major, minor) = gpu.capability();
    let _ = write!(
        s,
        "{{\n  \"device\": {:?},\n  \"capability\": \"{major}.{minor}\",\n  \"reps\": {reps},\n  \"timing\": \"CUDA events around each run, L2 flushed before each, median\",\n  \"rows\": [",
        gpu.device_name()
    );
    for (i, r) in rows.iter().enumerate() {
        let shape: Vec<String> = r.shape.iter().map(ToString::to_string).collect();
        let _ = write!(
            s,
            "{}\n    {{\"kind\": \"{}\", \"shape\": [{}], \"mode\": \"{}\", \"median_us\": {:.3}, \"p10_us\": {:.3}, \"p90_us\": {:.3}, \"rel_err\": {:.3e}}}",
            if i == 0 { "" } else { "," },
            r.kind,
            shape.join(", "),
            r.mode.name(),
            r.times.0,
            r.times.1,
            r.times.2,
            r.rel_err
        );
    }
    s.push_str("\n  ]\n}\n");
    s
}

fn run(o: &Options) -> Result<bool, KernelError> {
    let gpu = GpuFisher::new()?;
    eprintln!(
        "gpu-bench on {} (compute {}.{}), {} reps",
        gpu.device_name(),
        gpu.capability().0,
        gpu.capability().1,
        o.reps
    );
    let seed = reference::time_seed();
    eprintln!("seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let modes: Vec<Mode> = [Mode::Fp32, Mode::Tf32]
        .into_iter()
        .filter(|&m| gpu.supports(m))
        .collect();
    let mut rows = Vec::new();
    for &p in &PRODUCTS {
        for &mode in &modes {
            rows.push(product_row(&gpu, o, &mut rng, p, mode)?);
        }
    }
    for &p in &SITES {
        for &mode in &modes {
            rows.push(site_row(&gpu, o, &mut rng, p, mode)?);
        }
    }
    let mut ok = true;
    println!(
        "{:<10} {:<26} {:<5} {:>11} {:>11} {:>11} {:>10}",
        "kind", "shape", "mode", "median µs", "p10 µs", "p90 µs", "rel err"
    );
    for r in &rows {
        // NaN (an unwritten output) is bad too.
        let bad = r.rel_err.is_nan() || r.rel_err > tol(r.mode);
        ok &= !bad;
        println!(
            "{:<10} {:<26} {:<5} {:>11.1} {:>11.1} {:>11.1} {:>10.2e}{}",
            r.kind,
            format!("{:?}", r.shape),
            r.mode.name(),
            r.times.0,
            r.times.1,
            r.times.2,
            r.rel_err,
            if bad { "  WRONG" } else { "" }
        );
    }
    let text = json(&gpu, &rows, o.reps);
    match &o.out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &text) {
                eprintln!("error: cannot write {path}: {e}");
                return Ok(false);
            }
            eprintln!("wrote {path}");
        }
        None => print!("{text}"),
    }
    if !ok {
        eprintln!(
            "error: a correctness check failed (rows marked WRONG); timings of those rows mean nothing"
        );
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
