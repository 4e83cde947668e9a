//! `compute.blas`: runs a process's matrix products on a chosen OpenBLAS kernel family.
//!
//! Debian's OpenBLAS is a dynamic-arch build: when it loads, before `main`, it picks
//! kernels for the CPU it detects, or the family named by `OPENBLAS_CORETYPE`. The
//! families round differently (FMA or separate multiply and add, other blockings), so
//! the same config gives other last bits on another CPU, and 0.3.21 takes recent
//! Xeons it does not know for a Prescott (SSE3 kernels, 2-3× slower than AVX2). A
//! config that names a family gets it on every CPU that can run it: when the library
//! runs another, the process replaces itself (`exec`, same pid, same arguments) with
//! `OPENBLAS_CORETYPE` set. There is no call to switch kernels once loaded.

use std::ffi::{CStr, c_char};

use anyhow::{Result, bail};

use crate::config::BlasKernel;

/// Set in the replaced process, so that a library that ignores `OPENBLAS_CORETYPE`
/// is an error instead of an endless loop of `exec`s.
const GUARD: &str = "FIBECFED_BLAS_REEXEC";

unsafe extern "C" {
    /// OpenBLAS's name for the kernel family it runs ("Haswell", "Prescott", ...).
    fn openblas_get_corename() -> *const c_char;
}

/// The kernel family the loaded OpenBLAS runs.
pub fn core_name() -> String {
    // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string (or null
    // in builds without the function's body; handled).
    let name = unsafe { openblas_get_corename() };
    if name.is_null() {
        return "unknown".to_owned();
    }
    // SAFETY: non-null, NUL-terminated, static for the life of the process.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// `OPENBLAS_CORETYPE`'s value for a family, and the CPU features it needs.
fn family(kernel: BlasKernel) -> Option<(&'static str, &'static [&'static str])> {
    match kernel {
        BlasKernel::Auto => None,
        BlasKernel::Haswell => Some(("Haswell", &["avx2", "fma"])),
        BlasKernel::Skylakex => Some((
            "SkylakeX",
            &["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"],
        )),
    }
}

/// Features of `needed` this CPU lacks.
fn missing_features(needed: &[&'static str]) -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        needed
            .iter()
            .copied()
            .filter(|f| match *f {
                "avx2" => !has!("avx2"),
                "fma" => !has!("fma"),
                "avx512f" => !has!("avx512f"),
                "avx512bw" => !has!("avx512bw"),
                "avx512dq" => !has!("avx512dq"),
                "avx512vl" => !has!("avx512vl"),
                _ => true,
            })
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        needed.to_vec()
    }
}

/// The family `kernel` asks for, when it is not `Auto`: its `OPENBLAS_CORETYPE` name,
/// its config spelling and the kernels OpenBLAS runs now; an error when this CPU cannot
/// run it.
fn requested(kernel: BlasKernel) -> Result<Option<(&'static str, &'static str, String)>> {
    let Some((name, needs)) = family(kernel) else {
        return Ok(None);
    };
    let key = serde_plain_name(kernel);
    let lacking = missing_features(needs);
    if !lacking.is_empty() {
        bail!(
            "compute.blas = \"{key}\": this CPU lacks {} (or is not x86-64); use \"haswell\" (AVX2) or \"auto\"",
            lacking.join(", ")
        );
    }
    Ok(Some((name, key, core_name())))
}

/// Returns when the loaded OpenBLAS runs `kernel` (always for `Auto`); otherwise
/// replaces the process with one that does, and only returns an error: the CPU
/// cannot run the family, or the library ignored the request.
pub fn use_kernel(kernel: BlasKernel) -> Result<()> {
    let Some((name, key, running)) = requested(kernel)? else {
        return Ok(());
    };
    if running.eq_ignore_ascii_case(name) {
        return Ok(());
    }
    if std::env::var_os(GUARD).is_some() {
        bail!(
            "compute.blas = \"{key}\": OpenBLAS still runs its {running} kernels with OPENBLAS_CORETYPE={name}; this OpenBLAS is not a dynamic-arch build (Debian's libopenblas0-pthread is); use \"auto\""
        );
    }
    reexec(name)
}

/// For a process that cannot restart itself (a Python interpreter that imported
/// the bindings): returns when the loaded OpenBLAS runs `kernel`, and otherwise says
/// which environment variable to set before the process starts.
pub fn check_kernel(kernel: BlasKernel) -> Result<()> {
    let Some((name, key, running)) = requested(kernel)? else {
        return Ok(());
    };
    if !running.eq_ignore_ascii_case(name) {
        bail!(
            "compute.blas = \"{key}\": OpenBLAS runs its {running} kernels in this process; start it with OPENBLAS_CORETYPE={name} in its environment (OpenBLAS reads it once, when it loads)"
        );
    }
    Ok(())
}

/// The config spelling of a family, for messages.
fn serde_plain_name(kernel: BlasKernel) -> &'static str {
    match kernel {
        BlasKernel::Auto => "auto",
        BlasKernel::Haswell => "haswell",
        BlasKernel::Skylakex => "skylakex",
    }
}

#[cfg(unix)]
fn reexec(name: &str) -> Result<()> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("compute.blas: cannot find this program")?;
    let mut args = std::env::args_os();
    args.next();
    let err = std::process::Command::new(&exe)
        .args(args)
        .env("OPENBLAS_CORETYPE", name)
        .env(GUARD, "1")
        .exec();
    Err(err).with_context(|| {
        format!(
            "compute.blas: cannot restart {} with OPENBLAS_CORETYPE={name}",
            exe.display()
        )
    })
}

#[cfg(not(unix))]
fn reexec(name: &str) -> Result<()> {
    bail!(
        "compute.blas: set OPENBLAS_CORETYPE={name} before starting fibecfed (this system cannot restart a process in place)"
    )
}
