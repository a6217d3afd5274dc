//! `logitprobe merge`: join a sharded run's shards.

use crate::cli::MergeArgs;

pub fn run(args: &MergeArgs) -> anyhow::Result<()> {
    let merged = logitprobe::cluster::merge::merge(&args.dir)?;
    if let Some(t) = &merged.summary_table {
        print!("{t}");
    }
    let unit = if merged.kind == "compare" {
        "chunks"
    } else {
        "prompts"
    };
    eprintln!(
        "merged {} shards of {} ({} {unit}) into {}",
        merged.shards,
        merged.kind,
        merged.units,
        args.dir.display()
    );
    Ok(())
}
