//! `trace --config FILE.yaml`: the file's keys become `--flag=value` arguments placed before
//! the command line's own, and clap parses them all at once. A flag given on the command line
//! too overrides the file's (each flag overrides itself); list flags (`--prompt`, `--stop`)
//! take the file's values only when the command line gives none. Keys are the long flag names
//! with underscores, as Token Heatmap's YAML writes them; no flag is named here again.

use super::Cli;
use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser};
use logitprobe_backends::usage;
use serde_json::Value;
use std::ffi::OsString;
use std::path::Path;

/// A config file larger than this is not a config file (`/dev/zero`, a model given by mistake).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Token Heatmap's names for two of our flags.
const KEY_ALIASES: &[(&str, &str)] = &[("sample_top_k", "top_k"), ("output_dir", "out")];

/// The command line with a `trace --config` file's settings in it; any other command line as
/// it is. A command line clap cannot parse is returned as it is, for clap to say why.
pub fn expand(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Ok(cli) = Cli::try_parse_from(&argv) else {
        return Ok(argv);
    };
    let super::Command::Trace(given) = &cli.command else {
        return Ok(argv);
    };
    let Some(path) = &given.config else {
        return Ok(argv);
    };
    let Some(map) = read(path)? else {
        return Ok(argv);
    };
    let at = subcommand_at(&argv).expect("a trace command line names trace");
    let gives_list = |key: &str| match key {
        "prompt" => !given.prompt.is_empty(),
        "stop" => !given.stop.is_empty(),
        _ => false,
    };
    let mut settled = Vec::new();
    let mut conditional = Vec::new();
    for (key, value) in &map {
        for arg in arguments(path, key, value, &gives_list)? {
            match parse(std::slice::from_ref(&arg)) {
                Ok(()) => settled.push(arg),
                // A setting that needs another (`lens_layers` needs `capture_logit_lens`):
                // taken where that one is set, inert where it is not.
                Err(e) if e.kind() == ErrorKind::MissingRequiredArgument => conditional.push(arg),
                Err(e) => return Err(bad_value(key, value, &e)),
            }
        }
    }
    let with = |extra: &[OsString]| -> Vec<OsString> {
        let mut v: Vec<OsString> = argv[..=at].to_vec();
        v.extend(settled.iter().cloned());
        v.extend(extra.iter().cloned());
        v.extend(argv[at + 1..].iter().cloned());
        v
    };
    let mut kept = Vec::new();
    for arg in conditional {
        let mut trial = kept.clone();
        trial.push(arg.clone());
        let missing = Cli::try_parse_from(with(&trial))
            .is_err_and(|e| e.kind() == ErrorKind::MissingRequiredArgument);
        if !missing {
            kept = trial;
        }
    }
    Ok(with(&kept))
}

/// Where the subcommand stands in `argv` (after the program and global flags).
fn subcommand_at(argv: &[OsString]) -> Option<usize> {
    argv.iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| !a.to_string_lossy().starts_with('-'))
        .map(|(i, _)| i)
}

/// The file's mapping, `None` for an empty file. Read only from a regular file of bounded
/// size: a FIFO or `/dev/zero` given by mistake is refused, not read forever.
fn read(path: &Path) -> anyhow::Result<Option<serde_json::Map<String, Value>>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        usage!(
            "cannot read config {}: {e}; check the --config path",
            path.display()
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(&e))?;
    if !meta.is_file() {
        return Err(unreadable(&"not a regular file"));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(unreadable(&format!(
            "{} bytes, more than a config's {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(&e))?;
    let value: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| usage!("config {} is not valid YAML: {e}", path.display()))?;
    match value {
        Value::Object(m) => Ok(Some(m)),
        Value::Null => Ok(None),
        _ => Err(usage!(
            "config {} must be a mapping of option: value",
            path.display()
        )),
    }
}

/// The arguments one key of the file stands for.
fn arguments(
    path: &Path,
    key: &str,
    value: &Value,
    gives_list: &dyn Fn(&str) -> bool,
) -> anyhow::Result<Vec<OsString>> {
    let name = KEY_ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, name)| name);
    let long = name.replace('_', "-");
    let cmd = Cli::command();
    let trace = cmd.find_subcommand("trace").expect("trace is a subcommand");
    let Some(arg) = trace
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
    else {
        // Token Heatmap captures more than we do; its keys for those are fine when off.
        if let Some(what) = key.strip_prefix("capture_") {
            return match value {
                Value::Bool(false) | Value::Null => Ok(Vec::new()),
                _ => Err(usage!(
                    "config key '{key}': capturing {what} is not available (logitprobe captures the logit lens and attention: capture_logit_lens, capture_attention); set it to false or remove it"
                )),
            };
        }
        return Err(usage!(
            "config {} has an unknown key '{key}'; keys are the long flag names with underscores (see logitprobe trace --help)",
            path.display()
        ));
    };
    let flag = |v: &str| OsString::from(format!("--{long}={v}"));
    match (arg.get_action(), value) {
        (_, Value::Null) => Ok(Vec::new()),
        (ArgAction::SetTrue, Value::Bool(on)) => Ok(if *on {
            vec![format!("--{long}").into()]
        } else {
            Vec::new()
        }),
        (ArgAction::SetTrue, _) => Err(usage!(
            "config key '{key}' has a bad value {value}: use true or false"
        )),
        (ArgAction::Append, _) if gives_list(name) => Ok(Vec::new()),
        (ArgAction::Append, Value::Array(items)) => items
            .iter()
            .map(|v| scalar(key, v).map(|s| flag(&s)))
            .collect(),
        (_, Value::Bool(on)) if takes_on_off(arg) => Ok(vec![flag(if *on { "on" } else { "off" })]),
        _ => Ok(vec![flag(&scalar(key, value)?)]),
    }
}

/// A switch written as on/off (flash attention), which YAML reads as a boolean.
fn takes_on_off(arg: &clap::Arg) -> bool {
    let values = arg.get_possible_values();
    values.iter().any(|v| v.get_name() == "on") && values.iter().any(|v| v.get_name() == "off")
}

/// One value as the command line writes it.
fn scalar(key: &str, value: &Value) -> anyhow::Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(usage!(
            "config key '{key}' has a bad value {value}: give one value, as on the command line"
        )),
    }
}

/// Parses `trace ARGS` alone: whether the file's values are ones its flags take.
fn parse(args: &[OsString]) -> Result<(), clap::Error> {
    let mut argv: Vec<OsString> = vec!["logitprobe".into(), "trace".into()];
    argv.extend(args.iter().cloned());
    Cli::try_parse_from(argv).map(|_| ())
}

fn bad_value(key: &str, value: &Value, e: &clap::Error) -> anyhow::Error {
    let reason = e
        .render()
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    usage!("config key '{key}' has a bad value {value}: {reason}")
}
