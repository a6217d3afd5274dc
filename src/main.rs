use clap::Parser;
use logitprobe::cli::{Cli, Command};
use logitprobe_backends::UsageError;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
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
        Command::Trace(mut args) => logitprobe::commands::trace::run(&mut args, verbose, command)
            .map(|interrupted| {
                if interrupted {
                    ExitCode::from(130)
                } else {
                    ExitCode::SUCCESS
                }
            }),
        Command::Models => logitprobe::commands::models::run().map(|_| ExitCode::SUCCESS),
        Command::Inspect(args) => {
            logitprobe::commands::inspect::run(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Compare(args) => {
            logitprobe::commands::compare::run(&args, verbose, command).map(|_| ExitCode::SUCCESS)
        }
        Command::Report(args) => {
            logitprobe::commands::report::run(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            logitprobe::commands::serve::run(&args, verbose).map(|_| ExitCode::SUCCESS)
        }
        Command::Tokenize(args) => {
            logitprobe::commands::tokenize::run(&args, verbose).map(|_| ExitCode::SUCCESS)
        }
        Command::Merge(args) => logitprobe::commands::merge::run(&args).map(|_| ExitCode::SUCCESS),
        Command::Slurm(args) => logitprobe::commands::slurm::run(&args).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let engine = e
                .chain()
                .find_map(|c| c.downcast_ref::<logitprobe_backends::Error>());
            // What the user can fix exits 2: bad flags and inputs, an output folder that holds
            // another sharded job, shards still missing at a merge.
            let usage = engine.is_some()
                || e.chain().any(|c| {
                    c.is::<UsageError>()
                        || c.is::<logitprobe::shard::PlanError>()
                        || c.is::<logitprobe::merge::MergeError>()
                });
            // One line: the chain of causes, outermost first, then what to change.
            let mut msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            if let Some(fix) = engine.and_then(fix_for) {
                msg.push_str("; ");
                msg.push_str(&fix);
            }
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The flags that fix what an engine refused (the library names no flag).
fn fix_for(e: &logitprobe_backends::Error) -> Option<String> {
    use logitprobe_backends::Error;
    match e {
        Error::KvCacheTooLarge { .. } | Error::KvCacheAlloc { .. } => Some(
            "lower --parallel or --ctx-size, or quantize the KV cache (--cache-type-k q8_0 --cache-type-v q8_0)".into(),
        ),
        Error::TooManySlots { max, .. } => Some(format!("use --parallel {max} or less")),
        Error::ContextFull { .. } => Some("raise --ctx-size or shorten the prompt".into()),
        Error::ContextBeyondModel { .. } => Some("lower --ctx-size".into()),
        Error::ModelUnreadable { .. } => Some("check the --model path".into()),
        Error::NotGguf { .. } => {
            Some("pass a .gguf model, or use --backend onnx for an ONNX folder".into())
        }
        Error::NeedsGpuBuild { .. } => Some(
            "rebuild logitprobe with --features llama-cuda, llama-metal or llama-vulkan, or drop --n-gpu-layers".into(),
        ),
        Error::QuantizedVNeedsFlashAttn { .. } => {
            Some("drop --flash-attn off, or use --cache-type-v f16".into())
        }
        Error::UnknownDevice { .. } => Some("pass --device cpu, cuda or auto".into()),
        Error::CudaUnavailable { .. } => Some("or use --device cpu".into()),
        Error::OrtLibNotFound => Some(
            "run models/fetch onnxruntime, `pip install onnxruntime`, or pass --ort-lib /path/to/libonnxruntime.so".into(),
        ),
        Error::OrtLibMissing { .. } => {
            Some("fix --ort-lib / ORT_DYLIB_PATH or run models/fetch onnxruntime".into())
        }
        Error::EngineNotBuilt { engine } => {
            Some(format!("rebuild logitprobe with `--features {engine}`"))
        }
        Error::BadTestModel { .. } => Some("e.g. --model 300:0".into()),
        Error::LayerOutOfRange { part, n_layer, .. } => Some(format!(
            "give {} layers between 0 and {} (or all)",
            match part {
                logitprobe_backends::InsidePart::LogitLens => "--lens-layers",
                logitprobe_backends::InsidePart::Attention => "--attention-layers",
            },
            n_layer.saturating_sub(1)
        )),
        Error::AttentionNeedsFlashAttnOff => {
            Some("use --flash-attn off (or auto) with --capture-attention".into())
        }
        Error::AttentionFused { .. } => {
            Some("drop --capture-attention (the logit lens still works)".into())
        }
        Error::AttentionWindowed { n_swa, .. } => {
            Some(format!("use --ctx-size {n_swa} or less with --capture-attention"))
        }
        Error::LensUnknownArchitecture { .. } | Error::LensHeadUnreadable { .. } => {
            Some("drop --capture-logit-lens for this model".into())
        }
        Error::GraphNotUnderstood { .. } => Some(
            "drop --capture-logit-lens and --capture-attention for this export".into(),
        ),
        Error::CaptureUnsupported { .. } => Some(
            "drop --capture-logit-lens and --capture-attention, or use --backend llama or onnx".into(),
        ),
        _ => None,
    }
}

/// clap's own errors, on one line (help and version print as usual).
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::SUCCESS
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
