//! Everything the GPU path can refuse or fail with.

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
    /// The driver loaded but offers no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC rejected the sources; `log` is its compiler log.
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
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
    Shape(String),
    /// A mode the device cannot run (tf32 needs compute capability 8.0 or later).
    #[error("{0}")]
    Unsupported(String),
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
