//! Runs split over machines: a run's shards ([`shard`]), their merge into the files of one
//! run ([`merge`]), and Slurm array jobs that run and merge them ([`slurm`]).

pub mod merge;
pub mod shard;
pub mod slurm;
