//! Diagonal empirical Fisher information for FibecFed: per-sample gradient squares,
//! sample difficulty, layer importance and sparse-update masks.
//!
//! Not built yet: this crate is a placeholder in the workspace shape and is filled in by
//! the issue "Fisher information and curriculum". It will consume the per-site backward
//! hook that `fibecfed-transformer` exposes (`SiteHook`).
