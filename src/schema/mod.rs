//! The files logitprobe writes and reads, as plain serde types: the Token Heatmap trace and
//! `run.json`, `compare.json` and its shard records, the names of a run's files, and a
//! shard's identity. Nothing here computes; the layers above fill these in.

pub mod compare;
pub mod layout;
pub mod run;
pub mod shard;
pub mod trace;
