//! `logitprobe slurm`: submit a sharded trace or compare as a Slurm job array and a merge
//! job, or show where such a run stands.

use crate::cli::{Cli, Command, SlurmArgs, SlurmCommand, SlurmSubmitArgs};
use crate::commands::trace::TracePlan;
use clap::Parser;
use logitprobe::cluster::shard::{Plan, PlanError};
use logitprobe::cluster::slurm::{ArrayJob, Resources};
use logitprobe_backends::usage;
use std::path::{Path, PathBuf};

pub fn run(args: &SlurmArgs) -> anyhow::Result<()> {
    match &args.command {
        SlurmCommand::Trace(a) => submit("trace", a),
        SlurmCommand::Compare(a) => submit("compare", a),
        SlurmCommand::Status { dir } => status(dir),
    }
}

/// Checks the command's own flags as the command would (no model is loaded), and returns its
/// output folder and the flags to run, with a seed added where a trace has none.
fn check_flags(
    kind: &str,
    flags: &[String],
) -> anyhow::Result<(PathBuf, Vec<String>, Option<String>)> {
    let argv = ["logitprobe".to_string(), kind.to_string()]
        .into_iter()
        .chain(flags.iter().cloned());
    let cli = Cli::try_parse_from(argv).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("").trim();
        let first = first.strip_prefix("error: ").unwrap_or(first);
        usage!("the {kind} flags after --: {first}")
    })?;
    let mut flags = flags.to_vec();
    let mut note = None;
    let taken = |asked: bool| {
        if asked {
            Err(usage!(
                "--shard and --shards go before -- (as --shards N): each task's shard is its array index"
            ))
        } else {
            Ok(())
        }
    };
    let out = match cli.command {
        Command::Trace(mut t) => {
            taken(t.shard.asked())?;
            let plan = TracePlan::from_args(&mut t)?;
            if !matches!(
                plan.prompts,
                logitprobe::generate::prompts::PromptList::File(_)
            ) {
                return Err(usage!(
                    "a sharded trace splits a --prompts-file: give one after --"
                ));
            }
            if !plan.seed_given {
                // Every shard must draw from the same seed: fix one now.
                note = Some(format!(
                    "no --seed given: the tasks run with --seed {}",
                    plan.gen.seed
                ));
                flags.extend(["--seed".to_string(), plan.gen.seed.to_string()]);
            }
            plan.out
        }
        Command::Compare(c) => {
            taken(c.shard.asked())?;
            if c.text_file.is_none() {
                return Err(usage!(
                    "a sharded compare splits a --text-file into chunks: give one after --"
                ));
            }
            if let Some(a) = &c.a {
                crate::commands::compare::parse_side("--a", a)?;
            }
            for b in &c.b {
                crate::commands::compare::parse_side("--b", b)?;
            }
            c.out
                .unwrap_or_else(|| PathBuf::from(crate::commands::compare::DEFAULT_OUT))
        }
        _ => unreachable!("parsed as {kind}"),
    };
    Ok((out, flags, note))
}

fn submit(kind: &str, a: &SlurmSubmitArgs) -> anyhow::Result<()> {
    if a.shards == 0 {
        return Err(usage!("--shards 0 runs nothing: use 1 or more"));
    }
    let (out, flags, note) = check_flags(kind, &a.args)?;
    let workdir = std::env::current_dir()?;
    let out = workdir.join(out);
    // Nothing is written or submitted over shards of another count.
    if let Some(plan) = Plan::read(&out)? {
        if plan.shards != a.shards {
            return Err(PlanError::ShardsChanged {
                dir: out,
                found: plan.shards,
                given: a.shards,
            }
            .into());
        }
    }
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let job = ArrayJob {
        kind: kind.to_string(),
        shards: a.shards,
        exe: std::env::current_exe()?,
        args: flags,
        workdir,
        out: out.clone(),
        resources: Resources {
            partition: a.partition.clone(),
            time: a.time.clone(),
            cpus_per_task: a.cpus_per_task,
            mem: a.mem.clone(),
        },
    };
    if a.dry_run {
        println!(
            "# {}",
            job.slurm_dir()
                .join(logitprobe::cluster::slurm::ARRAY_SCRIPT)
                .display()
        );
        print!("{}", job.array_script());
        println!();
        println!(
            "# {} (sbatch --dependency=afterok:<array job id> --kill-on-invalid-dep=yes)",
            job.slurm_dir()
                .join(logitprobe::cluster::slurm::MERGE_SCRIPT)
                .display()
        );
        print!("{}", job.merge_script());
        return Ok(());
    }
    let s = job.submit()?;
    println!(
        "submitted array job {} ({} shards of {kind}) and merge job {} (runs when every shard succeeded)",
        s.array_job, s.shards, s.merge_job
    );
    println!("  follow:  squeue -j {},{}", s.array_job, s.merge_job);
    println!("           logitprobe slurm status {}", out.display());
    println!(
        "  after:   sacct -j {},{} --format=JobID,State,ExitCode,Elapsed",
        s.array_job, s.merge_job
    );
    println!("  logs:    {}", job.slurm_dir().join("logs").display());
    Ok(())
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let st = logitprobe::cluster::slurm::status(dir)?;
    let unit = if st.kind.as_deref() == Some("compare") {
        "chunks"
    } else {
        "prompts"
    };
    match &st.jobs {
        Some(j) => println!(
            "{} in {} shards at {} (array job {}, merge job {})",
            j.kind,
            j.shards,
            st.out.display(),
            j.array_job,
            j.merge_job
        ),
        None => println!(
            "{} in {} shards at {}",
            st.kind.as_deref().unwrap_or("run"),
            st.shards.len(),
            st.out.display()
        ),
    }
    println!("{:<6} {:<10} {unit}", "shard", "state");
    let script = dir
        .join(logitprobe::cluster::slurm::SLURM_DIR)
        .join(logitprobe::cluster::slurm::ARRAY_SCRIPT);
    let mut missing = Vec::new();
    for s in &st.shards {
        print!("{:<6} {:<10} {}/{}", s.shard, s.state, s.done, s.units);
        if s.state == "missing" {
            missing.push(s.shard.to_string());
        }
        println!();
    }
    println!("merge: {}", st.merge);
    if !missing.is_empty() {
        if script.is_file() {
            println!(
                "resubmit the missing shards: sbatch --array={} {}",
                missing.join(","),
                script.display()
            );
        } else {
            println!("run the missing shards again: {}", missing.join(", "));
        }
    }
    Ok(())
}
