//! Which shard of a sharded run a process is, as `run.json` and a compare shard record it.

use serde::{Deserialize, Serialize};

/// Where a shard's number came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardFrom {
    /// Given on the command line.
    #[serde(rename = "flag")]
    Flag,
    /// A Slurm job array task.
    #[serde(rename = "SLURM_ARRAY_TASK_ID")]
    Slurm,
    /// A Kubernetes Indexed Job's pod.
    #[serde(rename = "JOB_COMPLETION_INDEX")]
    Kubernetes,
}

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    pub from: ShardFrom,
}
