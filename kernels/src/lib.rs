//! Handwritten CUDA kernels (cudarc + NVRTC) for per-sample gradient squares.
//!
//! Not built yet: a placeholder in the workspace shape, filled in by the issue
//! "kernels: fused CUDA per-sample gradient squares". It depends only on cudarc, which
//! loads CUDA at run time, so CPU-only machines build it.
