//! `logitprobe models`: the catalogue, and what of it is already in the cache.

use hf_hub::{Cache, Repo, RepoType};
use logitprobe::hub::{catalog, hub_cache_dir, HubFile};
use logitprobe_backends::Backend;

fn cached(h: &HubFile) -> bool {
    Cache::new(hub_cache_dir())
        .repo(Repo::new(h.repo.clone(), RepoType::Model))
        .get(&h.file)
        .is_some()
}

fn show(h: Option<&HubFile>) -> String {
    match h {
        Some(h) => format!(
            "{}/{}{}",
            h.repo,
            h.file,
            if cached(h) { "  [cached]" } else { "" }
        ),
        None => "-".into(),
    }
}

pub fn run() -> anyhow::Result<()> {
    let entries = catalog();
    // Columns as wide as their longest entry, so a long name keeps the table aligned.
    let wa = entries
        .iter()
        .map(|e| e.alias.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let wn = entries
        .iter()
        .map(|e| e.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let files_at = wa + 1 + wn + 1 + 11 + 1;
    println!(
        "{:<wa$} {:<wn$} {:<11} files (--model ALIAS; cache: {})",
        "alias",
        "model",
        "backends",
        hub_cache_dir().display()
    );
    for e in entries {
        if e.fetched.is_some() {
            let line = |b: Backend| match e.fetched_for(b) {
                Some((path, how)) => format!(
                    "{}{}",
                    path.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
                    if path.exists() {
                        "  [cached]".to_string()
                    } else {
                        format!("  (run: {how})")
                    }
                ),
                None => "-".into(),
            };
            println!(
                "{:<wa$} {:<wn$} {:<11} gguf: {}",
                e.alias,
                e.name,
                "llama,onnx",
                line(Backend::Llama)
            );
            println!("{:<files_at$}onnx: {}", "", line(Backend::Onnx));
            continue;
        }
        let backends = match (&e.gguf, &e.onnx) {
            (Some(_), Some(_)) => "llama,onnx",
            (Some(_), None) => "llama",
            (None, Some(_)) => "onnx",
            (None, None) => "-",
        };
        println!(
            "{:<wa$} {:<wn$} {:<11} gguf: {}",
            e.alias,
            e.name,
            backends,
            show(e.gguf.as_ref())
        );
        println!("{:<files_at$}onnx: {}", "", show(e.onnx.as_ref()));
        if let Some(g) = &e.gated {
            println!(
                "{:<files_at$}original weights are gated: {g} (accept its license, set HF_TOKEN)",
                ""
            );
        }
    }
    Ok(())
}
