//! Library errors as the command line says them: each in the terms of its flags, one line,
//! and the exit code (2 for what the user can fix, 1 for the rest). The library names no flag;
//! this is where its typed errors meet them.

use logitprobe::cluster::merge::MergeError;
use logitprobe::cluster::shard::PlanError;
use logitprobe::cluster::slurm::NoShardedRun;
use logitprobe::compare::reference::ReferenceError;
use logitprobe::dist::row::ProbeConfigError;
use logitprobe::dist::sampler::BadSetting;
use logitprobe::generate::prompts::PromptsFileError;
use logitprobe::hub::{other_engine, HubError};
use logitprobe::text::chat::NoChatTemplate;
use logitprobe::util::OutputDirError;
use logitprobe_backends::UsageError;
use std::error::Error as StdError;
use std::process::ExitCode;

/// Prints `e` on one line (its chain of causes, outermost first, then what to change) and
/// gives the exit code.
pub fn report(e: &anyhow::Error) -> ExitCode {
    let engine = e
        .chain()
        .find_map(|c| c.downcast_ref::<logitprobe_backends::Error>());
    let usage = e.chain().any(is_usage);
    let disk = e.chain().find_map(disk_problem);
    let mut msg = String::new();
    for c in e.chain() {
        let part = in_flags(c).unwrap_or_else(|| c.to_string());
        // An error that shows its cause in its own text (`… folder X: Read-only file
        // system`) is followed in the chain by that cause again.
        if msg.contains(&part) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&part);
    }
    let full = disk.is_some();
    if let Some(fix) = engine.and_then(fix_for).or(disk) {
        msg.push_str("; ");
        msg.push_str(&fix);
    }
    eprintln!("error: {}", logitprobe::util::one_line(&msg));
    ExitCode::from(if usage || full { 2 } else { 1 })
}

/// A full or read-only disk: the user's to fix, by room or another place.
fn disk_problem(c: &(dyn StdError + 'static)) -> Option<String> {
    use std::io::ErrorKind;
    match io_kind(c)? {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            Some("free some space on that disk, or write elsewhere (--out, --reference)".into())
        }
        ErrorKind::ReadOnlyFilesystem => {
            Some("write to a writable place (--out, --reference)".into())
        }
        _ => None,
    }
}

/// The kind of an I/O error behind `c`: serde_json keeps the io::Error out of the chain (its
/// `source` skips it).
fn io_kind(c: &(dyn StdError + 'static)) -> Option<std::io::ErrorKind> {
    match c.downcast_ref::<std::io::Error>() {
        Some(e) => Some(e.kind()),
        None => c.downcast_ref::<serde_json::Error>()?.io_error_kind(),
    }
}

/// What the user can fix: bad flags and inputs, an output folder that holds another sharded
/// job, shards still missing at a merge, what an engine refuses.
fn is_usage(c: &(dyn StdError + 'static)) -> bool {
    c.is::<UsageError>()
        || c.is::<logitprobe_backends::Error>()
        || c.is::<PlanError>()
        || c.is::<MergeError>()
        || c.is::<HubError>()
        || c.is::<PromptsFileError>()
        || c.is::<NoChatTemplate>()
        || c.is::<NoShardedRun>()
        || c.is::<OutputDirError>()
        || c.is::<ProbeConfigError>()
        || c.is::<BadSetting>()
        || c.is::<ReferenceError>()
        || c.is::<logitprobe::compare::kld_base::KldBaseError>()
}

/// The flag a library setting is given with.
pub fn flag(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

/// A sampling setting out of range, with the setting written as its flag.
pub fn bad_setting(e: &BadSetting) -> String {
    format!("{} {} {}", flag(e.setting), e.value, e.rule)
}

/// The message of a library error that names a setting, in terms of the flags; `None` for
/// errors whose own message says it all.
fn in_flags(c: &(dyn StdError + 'static)) -> Option<String> {
    if let Some(e) = c.downcast_ref::<HubError>() {
        return Some(hub(e));
    }
    if let Some(e) = c.downcast_ref::<PromptsFileError>() {
        return Some(match e {
            PromptsFileError::Unreadable { path, reason } => {
                format!("cannot read --prompts-file {}: {reason}", path.display())
            }
            PromptsFileError::NotAFile { path } => format!(
                "--prompts-file {} is not a regular file; give a text or JSONL file, a pipe, or - for standard input",
                path.display()
            ),
            PromptsFileError::NoWriter { path, waited } => format!(
                "--prompts-file {} is a FIFO that nothing wrote to in {} s; start the program that writes it first, or give a regular file",
                path.display(),
                waited.as_secs()
            ),
            PromptsFileError::Terminal => "--prompts-file - reads standard input, which is a terminal; pipe the prompts in (`… | logitprobe trace --prompts-file -`) or give a file".into(),
            PromptsFileError::StreamTooLarge { path } => format!(
                "--prompts-file {} streams more than {} GiB; write the prompts to a file and give its path",
                path.display(),
                logitprobe::generate::prompts::STREAM_LIMIT >> 30
            ),
        });
    }
    if let Some(e) = c.downcast_ref::<NoChatTemplate>() {
        return Some(format!(
            "model {} has no chat template; give one with --chat-template NAME|JINJA or --chat-template-file, drop --use-chat-template (and --system-prompt), or use an instruct model",
            e.model
        ));
    }
    if let Some(e) = c.downcast_ref::<NoShardedRun>() {
        return Some(format!(
            "{} holds no sharded run (no shards/plan.json or slurm/jobs.json): give the --out of the run",
            e.dir.display()
        ));
    }
    if let Some(e) = c.downcast_ref::<MergeError>() {
        return Some(match e {
            MergeError::NotSharded { dir } => format!(
                "{} is not a sharded run (no {}/{}): give the --out of the shards",
                dir.display(),
                logitprobe::cluster::shard::SHARDS_DIR,
                logitprobe::cluster::shard::PLAN_JSON
            ),
            _ => e.message(|shards| format!("the same command with --shard K/{shards} for each")),
        });
    }
    if let Some(e) = c.downcast_ref::<OutputDirError>() {
        // A full or read-only disk gets its own advice at the end.
        if disk_problem(&e.source).is_some() {
            return Some(e.to_string());
        }
        return Some(format!("{e}; choose another --out"));
    }
    if let Some(e) = c.downcast_ref::<ProbeConfigError>() {
        return Some(match e {
            ProbeConfigError::MinKZero => {
                "--min-k 0 is invalid: keep at least one candidate (--min-k 1 or more)".into()
            }
            ProbeConfigError::MinKAboveMaxK { min_k, max_k } => {
                format!("--min-k {min_k} is larger than --max-k {max_k}: make --min-k <= --max-k")
            }
            ProbeConfigError::MassThreshold(m) => {
                format!("--mass-threshold {m} is outside (0, 1]: use e.g. 0.95")
            }
            ProbeConfigError::Eps(_) => e.to_string(),
        });
    }
    if let Some(e) = c.downcast_ref::<BadSetting>() {
        return Some(bad_setting(e));
    }
    if let Some(e) = c.downcast_ref::<ReferenceError>() {
        return reference(e);
    }
    None
}

fn reference(e: &ReferenceError) -> Option<String> {
    Some(match e {
        ReferenceError::Mismatch {
            dir,
            field,
            theirs,
            ours,
        } => format!(
            "--reference {} was made with another {field}: {theirs} there, {ours} in this run; give another --reference folder, or delete this one to make it anew",
            dir.display()
        ),
        ReferenceError::Missing { dir } => format!(
            "--reference {} holds no reference, and no --a was given to make one: pass --a BACKEND:MODEL, or the --reference folder of an earlier comparison",
            dir.display()
        ),
        ReferenceError::Incomplete {
            dir,
            missing,
            total,
        } => format!(
            "--reference {} lacks {missing} of its {total} chunks: pass --a with the model it was made with to score them",
            dir.display()
        ),
        _ => return None,
    })
}

fn hub(e: &HubError) -> String {
    match e {
        HubError::FileNotInRepo { file, repo } => format!(
            "{file} not found in {repo}: check --model-file (the repo's file list is on huggingface.co/{repo})"
        ),
        HubError::RepoNeedsFile { repo } => format!(
            "--model {repo} is a repo: name the GGUF file with --model-file, e.g. --model-file model-q4_k_m.gguf"
        ),
        HubError::CannotListRepo { repo, reason } => format!(
            "cannot list the files of {repo} on the Hugging Face Hub ({reason}); name the file with --model {repo} --model-file FILE.gguf"
        ),
        HubError::NoCatalogueBuild { alias, backend } => format!(
            "{alias} has no {} build in the catalogue; use --backend {} or export one (models/README.md)",
            backend.name(),
            other_engine(*backend)
        ),
        HubError::QuantNeedsLlama { model } => format!(
            "{model} names a GGUF quantization: use --backend llama (or leave --backend out)"
        ),
        HubError::QuantAndFile { model } => format!(
            "{model} names its file by quantization and --model-file names one too: give one of them"
        ),
        HubError::GgufNeedsLlama { model } => {
            format!("{model} is a GGUF file: use --backend llama (or leave --backend out)")
        }
        HubError::OnnxNeedsOnnx { model, folder } => format!(
            "{model} is {}: use --backend onnx (or leave --backend out)",
            if *folder {
                "a folder (an ONNX export?)"
            } else {
                "an ONNX file"
            }
        ),
    }
}

/// The flags that fix what an engine refused (the library names no flag).
pub fn fix_for(e: &logitprobe_backends::Error) -> Option<String> {
    use logitprobe_backends::Error;
    match e {
        Error::KvCacheTooLarge { .. } | Error::KvCacheAlloc { .. } => Some(
            "lower --parallel or --ctx-size, or quantize the KV cache (--cache-type-k q8_0 --cache-type-v q8_0)".into(),
        ),
        Error::TooManySlots { max, .. } => Some(format!("use --parallel {max} or less")),
        Error::ContextFull { .. } => Some("raise --ctx-size or shorten the prompt".into()),
        Error::BeyondTrainedContext { .. } => {
            Some("shorten the prompt".into())
        }
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
