//! Server-side aggregation over named tensors (FedAvg, FedProx, FedAdam, FedYogi) and
//! byte accounting.
//!
//! Not built yet: a placeholder in the workspace shape, filled in by the issue "Full
//! FibecFed rounds with baselines".
