//! Curriculum orderings and pacing functions for FibecFed: which sample ids a client
//! trains on at round t.
//!
//! Not built yet: a placeholder in the workspace shape, filled in by the issue "Fisher
//! information and curriculum".
