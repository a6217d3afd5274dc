//! One module per subcommand.

pub mod compare;
pub mod inspect;
pub mod merge;
pub mod models;
pub mod report;
pub mod serve;
pub mod slurm;
pub mod tokenize;
pub mod trace;
