//! Everything the GPU path can refuse or fail with.

use crate::Mode;

/// A typed reason, so that callers can fall back to the CPU and say why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// `libcuda` could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver (libcuda not found)")]
    NoDriver,
    /// `libnvrtc` could not be loaded: the kernels are compiled at run time and need it.
    #[error(
        "no NVRTC (libnvrtc.so.13 or an older libnvrtc not found; add its folder, e.g. a \
         CUDA toolkit's lib64 or the nvidia-cuda-nvrtc wheel's lib, to LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// The driver loaded but offers no device number `ordinal`: it counts `count`
    /// devices. `driver` is the driver's own answer when it refused to count any.
    #[error("no CUDA device: {}", no_device(*.ordinal, *.count, .driver.as_deref()))]
    NoDevice {
        ordinal: usize,
        count: usize,
        driver: Option<String>,
    },
    /// NVRTC rejected the sources; `log` is its compiler log.
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    /// Neither form of the kernels loads on the device: the CUBIN NVRTC built for its
    /// `sm_XY` (or why it could not build it) and the PTX for `compute_XY`, which the
    /// driver refuses when NVRTC is newer than the driver (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`).
    #[error(
        "the kernels load neither as a CUBIN for {arch} ({cubin}) nor as PTX ({ptx}); NVRTC {nvrtc}, driver {driver}"
    )]
    NoBinary {
        arch: String,
        cubin: String,
        ptx: String,
        nvrtc: String,
        driver: String,
    },
    /// A driver call failed; `during` names what was being done.
    #[error("CUDA error while {during}: {message}")]
    Driver {
        during: &'static str,
        message: String,
    },
    /// cudarc panicked inside a driver call (it does on some missing symbols); caught so
    /// that the caller can fall back instead of aborting.
    #[error("the CUDA bindings panicked while {during}: {message}")]
    Panicked {
        during: &'static str,
        message: String,
    },
    /// Inputs whose lengths do not match the shapes, or shapes the kernels cannot index.
    #[error("shapes: {0}")]
    Shape(#[from] ShapeError),
    /// A mode the device cannot run: tf32 needs compute capability 8.0 or later
    /// (fp32 runs everywhere).
    #[error(
        "{} needs compute capability 8.0 or later; {device} is {}.{}",
        .mode.name(), .capability.0, .capability.1
    )]
    Unsupported {
        mode: Mode,
        /// The device's name, as the driver gives it.
        device: String,
        /// (major, minor).
        capability: (i32, i32),
    },
}

fn no_device(ordinal: usize, count: usize, driver: Option<&str>) -> String {
    match (driver, count) {
        (Some(why), _) => format!("the driver found none ({why})"),
        (None, 0) => "the driver reports 0 devices".to_owned(),
        (None, count) => format!("device {ordinal} asked for, the driver reports {count}"),
    }
}

/// Why inputs were refused before any device work: each names the buffer or dimension
/// and the numbers involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A buffer's length disagrees with the shape: `buffer` ("x", "δ", "mask", "A",
    /// "B", "u = x·Aᵀ", "δ·B") holds `found` elements where `meaning` (e.g.
    /// "batch·seq_len × d_in") makes `expected`.
    #[error("{buffer} has {found} elements, expected {meaning} = {expected}")]
    Length {
        buffer: &'static str,
        expected: usize,
        found: usize,
        meaning: &'static str,
    },
    /// A product of dimensions (an element count, or its size in bytes) does not fit in
    /// `usize`.
    #[error("{what} overflows ({a} × {b})")]
    Overflow {
        what: &'static str,
        a: usize,
        b: usize,
    },
    /// A dimension the kernels cannot index with 32-bit integers.
    #[error("{dim} = {value} exceeds the kernels' limit of {limit}")]
    TooLarge {
        dim: &'static str,
        value: usize,
        limit: usize,
    },
    /// A per-sample gradient taller than one launch grid can cover.
    #[error(
        "the per-sample gradient ({rows} × {cols}) needs {tiles} tiles of {tile_rows} × {tile_cols}; one launch allows {limit} blocks"
    )]
    Grid {
        rows: usize,
        cols: usize,
        tile_rows: usize,
        tile_cols: usize,
        tiles: usize,
        limit: usize,
    },
    /// A job asked for with a zero dimension: there is nothing to launch (the
    /// `*_site` calls answer such shapes with zeros instead).
    #[error("{dim} is 0: nothing to launch")]
    Empty { dim: &'static str },
}

impl KernelError {
    /// Wraps a driver error with what was being done.
    pub(crate) fn driver(during: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |e| Self::Driver {
            during,
            message: e.to_string(),
        }
    }
}
