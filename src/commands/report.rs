//! `logitprobe report`: draw the plots and `report.html` again from a file on disk.

use crate::cli::ReportArgs;
use logitprobe::output;
use logitprobe::report::{self, ReportInput};
use std::path::PathBuf;

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let input = report::read(&args.input)?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("report"));
    output::prepare_dir(&out)?;
    // A report killed while it drew left its plots under temporary names.
    logitprobe::util::remove_partials(&out)
        .map_err(|e| anyhow::anyhow!("cleaning {}: {e}", out.display()))?;
    let files = match &input {
        ReportInput::Trace(t) => {
            let mut marks = report::TraceMarks::beside(&args.input, t);
            marks.lens_step = args.lens_step;
            report::write_trace_report(&out, t, &marks)?
        }
        ReportInput::Compare(c) => report::write_compare_report(&out, c)?,
    };
    for f in &files {
        println!("{}", f.display());
    }
    Ok(())
}
