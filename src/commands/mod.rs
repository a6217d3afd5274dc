//! One module per subcommand.

pub mod compare;
pub mod inspect;
pub mod models;
pub mod report;
pub mod serve;
pub mod tokenize;
pub mod trace;
