//! `logitprobe._logitprobe`: the compiled half of the `logitprobe` Python package.
//!
//! A [`model::Model`] owns an engine thread that holds the model (an engine's context is not
//! `Send`) and runs one job at a time: a trace, a stream, a score. Every job goes through the
//! library's own code (the generation loop and its sinks, the prompt feed, the probe, the
//! comparison), so the same settings and seed give what the command line gives, value for
//! value. The caller waits for a job with the GIL released, in short slices, between which it
//! looks for Python's signals: Ctrl-C raises the job's stop flag, waits for the step in
//! progress, and raises `KeyboardInterrupt`.
//!
//! Errors are Python exceptions (`logitprobe.Error` and its subclasses, defined in
//! `logitprobe/_errors.py`) with the command line's one-line messages, keyword arguments in
//! place of flags ([`errors`]).

mod compare;
mod convert;
mod engine;
mod errors;
mod model;
mod run;
mod settings;

use pyo3::prelude::*;

// A model's chat template runs under a memory budget that the global allocator enforces
// (logitprobe::util::budget), as in the command line.
#[global_allocator]
static ALLOC: logitprobe::util::budget::BudgetAlloc = logitprobe::util::budget::BudgetAlloc;

/// The compiled module; `logitprobe/__init__.py` re-exports what users need.
#[pymodule]
fn _logitprobe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::Model>()?;
    m.add_class::<run::Run>()?;
    m.add_class::<run::Stream>()?;
    m.add_class::<compare::Comparison>()?;
    m.add_function(wrap_pyfunction!(compare::compare, m)?)?;
    // Engine threads end, their models freed, before the interpreter exits.
    let close_all = wrap_pyfunction!(engine::close_all, m)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (close_all,))?;
    Ok(())
}
