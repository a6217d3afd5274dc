//! `logitprobe serve`: flags to a [`logitprobe::serve::ServeConfig`], then the server.

use crate::cli::ServeArgs;
use logitprobe::serve::{self, ServeConfig};

pub fn run(args: &ServeArgs, verbose: bool) -> anyhow::Result<()> {
    let backend = logitprobe::hub::infer_backend(&args.model, args.backend.map(Into::into));
    logitprobe::hub::check_backend_fits(backend, &args.model)?;
    let resolved = logitprobe::hub::resolve(backend, &args.model, args.model_file.as_deref())?;
    let opts = args.engine.options(verbose)?;
    let mut probe = args.probe.config()?;
    // The probe must keep as many candidates as the most top logprobs a request can ask for.
    if args.probe.max_k.is_none() {
        probe.max_k = probe.max_k.max(args.max_logprobs);
    }
    let cfg = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel.unwrap_or(4),
        max_queue: args.max_queue,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_logprobs: args.max_logprobs,
        logprobs_mode: args.logprobs_mode,
        max_body_bytes: args.max_body_bytes,
        probe,
        alias: args.alias.clone(),
    };
    if cfg.parallel == 0 {
        return Err(logitprobe_backends::usage!(
            "--parallel 0 serves nothing: use 1 or more"
        ));
    }
    if cfg.max_logprobs > cfg.probe.max_k {
        return Err(logitprobe_backends::usage!(
            "--max-logprobs {} is above --max-k {}: raise --max-k or lower --max-logprobs",
            cfg.max_logprobs,
            cfg.probe.max_k
        ));
    }
    let path = resolved.path.clone();
    serve::run(
        move || logitprobe_backends::open(backend, &path, &opts),
        cfg,
        |addr, model, slots| {
            // One line a script can wait for (and read the port from, with --port 0).
            println!("logitprobe serve: listening on http://{addr} (model {model}, {slots} slots)");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
    )
}
