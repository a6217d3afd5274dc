//! One module per subcommand.

pub mod inspect;
pub mod models;
pub mod tokenize;
pub mod trace;
