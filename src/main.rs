mod cli;
mod commands;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

// Bounds the memory a model's chat template may take (logitprobe::util::budget).
#[global_allocator]
static ALLOC: logitprobe::util::budget::BudgetAlloc = logitprobe::util::budget::BudgetAlloc;

fn main() -> ExitCode {
    // The documentation test checks that each command it shows parses, and runs none (nor
    // reads the config files they name).
    let check_only = std::env::var_os("LOGITPROBE_CHECK_ARGS").is_some();
    // A config file's settings become arguments before the command line's own.
    let argv = match check_only {
        true => std::env::args_os().collect(),
        false => match cli::config::expand(std::env::args_os().collect()) {
            Ok(argv) => argv,
            Err(e) => return cli::errors::report(&e),
        },
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    if check_only {
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose);
    if !matches!(cli.command, Command::Serve(_)) {
        // `logitprobe models | head -1`: a closed stdout ends the process quietly, as it ends
        // `ls` or `grep`, instead of a panic in println!. The server keeps Rust's default
        // (ignored), where a client that hangs up must not end it.
        // SAFETY: signal(2) with SIG_DFL before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let command: Vec<String> = std::env::args().collect();
    let verbose = cli.verbose > 0;
    let result = match cli.command {
        Command::Trace(mut args) => {
            commands::trace::run(&mut args, verbose, command).map(|ended| match ended {
                commands::trace::Ended::Finished => ExitCode::SUCCESS,
                // The shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM).
                commands::trace::Ended::Interrupted(signal) => ExitCode::from(128 + signal as u8),
            })
        }
        Command::Models => commands::models::run().map(|_| ExitCode::SUCCESS),
        Command::Inspect(args) => commands::inspect::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Compare(args) => {
            commands::compare::run(&args, verbose, command).map(|_| ExitCode::SUCCESS)
        }
        Command::Report(args) => commands::report::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Serve(args) => commands::serve::run(&args, verbose).map(|_| ExitCode::SUCCESS),
        Command::Tokenize(args) => {
            commands::tokenize::run(&args, verbose).map(|_| ExitCode::SUCCESS)
        }
        Command::Merge(args) => commands::merge::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Slurm(args) => commands::slurm::run(&args).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => cli::errors::report(&e),
    }
}

/// clap's own errors, on one line (help and version print as usual).
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        // `logitprobe` alone: the help, on stderr, and a usage error (clap's convention).
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            ExitCode::from(2)
        }
        _ => {
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect();
            let line = parts.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("error: {line}; see `logitprobe --help`");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOGITPROBE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: piped logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
