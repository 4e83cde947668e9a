//! `gpu-bench`: times the kernels at the reference shapes on the GPU machine and writes
//! JSON for `kernels/bench/pytorch_squares.py table`. Built and packaged by
//! `cargo xtask gpu-bench`; run there by `run.sh`.
//!
//! Per shape and mode: first a correctness check against the f64 reference on a cut of
//! the shape (same widths, batch ≤ 2 and T ≤ 32, where the f64 loops stay fast) with
//! outputs poisoned; then warm-up runs and `--reps` timed runs of the whole site (one
//! launch of the site kernel, which reads the sample lengths and sums its partials
//! itself), each preceded by an L2 flush and timed by CUDA events around it, as triton's
//! do_bench does for PyTorch. The timed job itself is checked too, after its last run:
//! each sample's S against the f64 Gram identity (`reference::gram_sq`, cheap at full
//! size), and Σ of the diagonal against Σ_n S_n; and every timed run's outputs must equal
//! the first run's bit for bit (read back outside the timed span). Inputs are random,
//! never zeros.
//! A failed check is written as `"check": "failed"` with the error (`null` when it is
//! not finite), never as a number JSON cannot hold.
//!
//! ```text
//! gpu-bench [--out FILE.json] [--reps N] [--quick]
//! ```

use std::fmt::Write as _;
use std::process::ExitCode;

use fibecfed_kernels::reference::{
    self, DenseData, LoraData, MaskKind, SplitMix64, per_sample_error, rel_error,
};
use fibecfed_kernels::{DenseShape, GpuFisher, KernelError, LoraShape, Mode, Timing};

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
    /// The cut shape against the f64 reference: every output, normwise.
    rel_err: f64,
    /// The timed job: the worst sample's S against the Gram identity, and Σ diag
    /// against Σ_n S_n.
    timed_err: f64,
    /// Timed runs whose outputs differed bit for bit from the first run's.
    differing: usize,
    times: (f64, f64, f64),
    clock: Timing,
    /// Why the row could not be measured (a kernel or driver error); the other rows
    /// still run and the JSON is still written.
    error: Option<String>,
}

impl Row {
    fn failed(&self) -> bool {
        // NaN (an unwritten output) is a failure too.
        !(self.rel_err <= tol(self.mode) && self.timed_err <= tol(self.mode))
            || self.differing > 0
            || self.error.is_some()
    }

    /// A row whose measurement failed with `error`.
    fn failed_with(kind: &'static str, shape: Vec<usize>, mode: Mode, error: &KernelError) -> Self {
        Self {
            kind,
            shape,
            mode,
            rel_err: f64::NAN,
            timed_err: f64::NAN,
            differing: 0,
            times: (f64::NAN, f64::NAN, f64::NAN),
            clock: Timing::Events,
            error: Some(error.to_string()),
        }
    }
}

/// Relative difference of two totals (both f64).
fn total_error(got: f64, want: f64) -> f64 {
    if got.is_nan() {
        f64::INFINITY
    } else if want == 0.0 {
        got.abs()
    } else {
        (got - want).abs() / want.abs()
    }
}

fn sum32(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum()
}

/// A JSON string literal: quotes, backslashes and control characters escaped (Rust's
/// `{:?}` writes escapes such as `\u{1b}` that JSON does not have).
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A time for JSON: three decimals, or null when not finite.
fn json_fixed(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".to_owned()
    }
}

/// A number for JSON: finite ones as they are, others as null.
fn json_number(v: f64, precision: usize) -> String {
    if v.is_finite() {
        format!("{v:.precision$e}")
    } else {
        "null".to_owned()
    }
}

fn tol(mode: Mode) -> f64 {
    match mode {
        Mode::Fp32 => FP32_TOL,
        Mode::Tf32 => TF32_TOL,
    }
}

/// What the timed runs gave: medians, the clock, and how many runs' outputs differed
/// bit for bit from the first run's (the reductions have a fixed order, so any
/// difference is a race or a visibility bug in the last-block reductions).
struct Timed {
    times: (f64, f64, f64),
    clock: Timing,
    differing: usize,
}

/// Warm-up, then `reps` timed runs; after each (outside the timed span) the outputs are
/// read back with `read` and compared with the first run's.
fn time_reps(
    gpu: &GpuFisher,
    o: &Options,
    mut run: impl FnMut() -> Result<(), KernelError>,
    mut read: impl FnMut() -> Result<Vec<f32>, KernelError>,
) -> Result<Timed, KernelError> {
    for _ in 0..o.warmup {
        run()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(o.reps);
    let mut clock = Timing::Events;
    let mut first: Option<Vec<u32>> = None;
    let mut differing = 0;
    for _ in 0..o.reps {
        gpu.flush_l2()?;
        let (us, used) = gpu.time_us(&mut run)?;
        if used != Timing::Events {
            clock = used;
        }
        times.push(us);
        let bits: Vec<u32> = read()?.iter().map(|v| v.to_bits()).collect();
        match &first {
            None => first = Some(bits),
            Some(f) if *f != bits => differing += 1,
            Some(_) => {}
        }
    }
    Ok(Timed {
        times: summary(times),
        clock,
        differing,
    })
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
    let rel_err = rel_error(&got.sq, &want.sq)
        .max(rel_error(&got.diag, &want.diag))
        .max(per_sample_error(&got.sq, &want.sq));

    let shape = DenseShape {
        batch: b,
        seq_len: t,
        d_in,
        d_out,
    };
    let data = DenseData::random(shape, MaskKind::Full, rng);
    let job = std::cell::RefCell::new(gpu.dense_job(&data.inputs())?);
    let timing = time_reps(
        gpu,
        o,
        || gpu.run_dense(&mut job.borrow_mut(), mode),
        || {
            let out = gpu.read_dense(&job.borrow())?;
            Ok([out.sq, out.diag].concat())
        },
    )?;
    let timed = gpu.read_dense(&job.borrow())?;
    let gram = reference::dense_gram(&data.inputs())?;
    let timed_err =
        per_sample_error(&timed.sq, &gram).max(total_error(sum32(&timed.diag), gram.iter().sum()));
    Ok(Row {
        kind: "product",
        shape: vec![b, t, d_in, d_out],
        mode,
        rel_err,
        timed_err,
        differing: timing.differing,
        times: timing.times,
        clock: timing.clock,
        error: None,
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
        per_sample_error(&got.sq_a, &want.sq_a),
        per_sample_error(&got.sq_b, &want.sq_b),
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
    let job = std::cell::RefCell::new(gpu.lora_job(&data.inputs(true))?);
    let timing = time_reps(
        gpu,
        o,
        || gpu.run_lora(&mut job.borrow_mut(), mode),
        || {
            let out = gpu.read_lora(&job.borrow())?;
            Ok([out.sq_a, out.sq_b, out.diag_a, out.diag_b].concat())
        },
    )?;
    let timed = gpu.read_lora(&job.borrow())?;
    let (gram_a, gram_b) = reference::lora_gram(&data.inputs(true))?;
    let timed_err = [
        per_sample_error(&timed.sq_a, &gram_a),
        per_sample_error(&timed.sq_b, &gram_b),
        total_error(sum32(&timed.diag_a), gram_a.iter().sum()),
        total_error(sum32(&timed.diag_b), gram_b.iter().sum()),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    Ok(Row {
        kind: "lora_site",
        shape: vec![b, t, d_in, d_out, r],
        mode,
        rel_err,
        timed_err,
        differing: timing.differing,
        times: timing.times,
        clock: timing.clock,
        error: None,
    })
}

fn json(gpu: &GpuFisher, rows: &[Row], reps: usize) -> String {
    let mut s = String::new();
    let (major, minor) = gpu.capability();
    let build = gpu.build_info();
    let clock = if rows.iter().all(|r| r.clock == Timing::Events) {
        Timing::Events
    } else {
        Timing::HostClock
    };
    let _ = write!(
        s,
        "{{\n  \"device\": {},\n  \"capability\": \"{major}.{minor}\",\n  \"nvrtc\": {},\n  \"driver\": {},\n  \"binary\": {},\n  \"occupancy\": {:?},\n  \"reps\": {reps},\n  \"timing\": {},\n  \"rows\": [",
        json_string(gpu.device_name()),
        json_string(&build.nvrtc),
        json_string(&build.driver),
        json_string(&build.binary),
        build.occupancy,
        json_string(&format!(
            "{} around each run, L2 flushed before each, median",
            clock.name()
        )),
    );
    for (i, r) in rows.iter().enumerate() {
        let shape: Vec<String> = r.shape.iter().map(ToString::to_string).collect();
        let _ = write!(
            s,
            "{}\n    {{\"kind\": \"{}\", \"shape\": [{}], \"mode\": \"{}\", \"median_us\": {}, \"p10_us\": {}, \"p90_us\": {}, \"rel_err\": {}, \"timed_err\": {}, \"runs_differing\": {}, \"check\": \"{}\", \"error\": {}}}",
            if i == 0 { "" } else { "," },
            r.kind,
            shape.join(", "),
            r.mode.name(),
            json_fixed(r.times.0),
            json_fixed(r.times.1),
            json_fixed(r.times.2),
            json_number(r.rel_err, 3),
            json_number(r.timed_err, 3),
            r.differing,
            if r.failed() { "failed" } else { "ok" },
            r.error
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_string),
        );
    }
    s.push_str("\n  ]\n}\n");
    s
}

fn run(o: &Options) -> Result<bool, KernelError> {
    let gpu = GpuFisher::new()?;
    let build = gpu.build_info();
    eprintln!(
        "gpu-bench on {} (compute {}.{}), {} reps; NVRTC {}, driver CUDA {}, kernels loaded as {}, resident blocks per SM (m8, m16, m64, tf32) {:?}",
        gpu.device_name(),
        gpu.capability().0,
        gpu.capability().1,
        o.reps,
        build.nvrtc,
        build.driver,
        build.binary,
        build.occupancy,
    );
    let seed = reference::time_seed();
    eprintln!("seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let modes: Vec<Mode> = [Mode::Fp32, Mode::Tf32]
        .into_iter()
        .filter(|&m| gpu.supports(m))
        .collect();
    let mut rows = Vec::new();
    // A failing row is recorded and the others still run: one error must not cost the
    // whole table.
    for &p in &PRODUCTS {
        for &mode in &modes {
            let (b, t, d_in, d_out) = p;
            rows.push(product_row(&gpu, o, &mut rng, p, mode).unwrap_or_else(|e| {
                eprintln!("error: product {p:?} {}: {e}", mode.name());
                Row::failed_with("product", vec![b, t, d_in, d_out], mode, &e)
            }));
        }
    }
    for &p in &SITES {
        for &mode in &modes {
            let (b, t, d_in, d_out, r) = p;
            rows.push(site_row(&gpu, o, &mut rng, p, mode).unwrap_or_else(|e| {
                eprintln!("error: LoRA site {p:?} {}: {e}", mode.name());
                Row::failed_with("lora_site", vec![b, t, d_in, d_out, r], mode, &e)
            }));
        }
    }
    let mut ok = true;
    println!(
        "{:<10} {:<26} {:<5} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "kind", "shape", "mode", "median µs", "p10 µs", "p90 µs", "rel err", "timed err"
    );
    for r in &rows {
        let bad = r.failed();
        ok &= !bad;
        println!(
            "{:<10} {:<26} {:<5} {:>11.1} {:>11.1} {:>11.1} {:>10.2e} {:>10.2e}{}",
            r.kind,
            format!("{:?}", r.shape),
            r.mode.name(),
            r.times.0,
            r.times.1,
            r.times.2,
            r.rel_err,
            r.timed_err,
            if r.differing > 0 {
                format!("  WRONG ({} runs differ from the first)", r.differing)
            } else if bad {
                "  WRONG".to_owned()
            } else {
                String::new()
            }
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
