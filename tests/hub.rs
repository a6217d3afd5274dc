//! Models from a Hugging Face repo id or a catalogue alias, against a cache folder laid out
//! here (the Hub itself is unreachable from CI) and a local stand-in server for its errors.

mod common;

use common::{assert_usage_error, bin, tiny};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

/// Lays out `repo` in the hub cache under `hf_home` with `files` (path in repo, source).
fn cache_repo(hf_home: &Path, repo: &str, files: &[(&str, &Path)]) {
    let dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(dir.join("refs")).unwrap();
    fs::write(dir.join("refs/main"), rev).unwrap();
    for (name, src) in files {
        let dst = dir.join("snapshots").join(rev).join(name);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(src, dst).unwrap();
    }
}

fn trace(hf_home: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let out = hf_home.join("out");
    let mut cmd = bin();
    cmd.env_remove("HF_TOKEN")
        .env_remove("HUGGINGFACE_HUB_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT");
    cmd.env("HF_HOME", hf_home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args([
        "trace",
        "--prompt",
        "In the beginning",
        "--max-new-tokens",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    cmd.args(args).output().unwrap()
}

#[cfg(feature = "llama")]
#[test]
fn gguf_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    cache_repo(
        tmp.path(),
        "someone/tiny-GGUF",
        &[("tiny-f32.gguf", &tiny("tiny-f32.gguf"))],
    );
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &[
            "--backend",
            "llama",
            "--model",
            "someone/tiny-GGUF",
            "--model-file",
            "tiny-f32.gguf",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run = fs::read_to_string(tmp.path().join("out/run.json")).unwrap();
    assert!(run.contains("snapshots"), "the model came from the cache");
}

#[cfg(feature = "onnx")]
#[test]
fn onnx_repo_from_the_cache_offline_with_hub_cache_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tiny("optimum");
    let files = [
        ("onnx/model.onnx", f.join("model.onnx")),
        ("tokenizer.json", f.join("tokenizer.json")),
        ("tokenizer_config.json", f.join("tokenizer_config.json")),
        ("config.json", f.join("config.json")),
        ("generation_config.json", f.join("generation_config.json")),
    ];
    let files: Vec<(&str, &Path)> = files.iter().map(|(a, b)| (*a, b.as_path())).collect();
    // HF_HUB_CACHE wins over HF_HOME.
    let other = tmp.path().join("elsewhere");
    cache_repo(&other, "someone/tiny-onnx", &files);
    let hub_cache = other.join("hub");
    let o = trace(
        tmp.path(),
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_CACHE", hub_cache.to_str().unwrap()),
        ],
        &["--backend", "onnx", "--model", "someone/tiny-onnx"],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
}

#[test]
fn offline_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &[
            "--backend",
            "llama",
            "--model",
            "someone/absent",
            "--model-file",
            "x.gguf",
        ],
    );
    assert_usage_error(&o, "HF_HUB_OFFLINE=1 forbids downloading");
}

#[test]
fn split_gguf_needs_every_part() {
    let tmp = tempfile::tempdir().unwrap();
    cache_repo(
        tmp.path(),
        "someone/split",
        &[("m-00001-of-00002.gguf", &tiny("tiny-f32.gguf"))],
    );
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &[
            "--backend",
            "llama",
            "--model",
            "someone/split",
            "--model-file",
            "m-00001-of-00002.gguf",
        ],
    );
    assert_usage_error(
        &o,
        "m-00002-of-00002.gguf of someone/split is not in the Hugging Face cache",
    );
}

#[test]
fn no_network() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nothing listens on: the connection is refused at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let o = trace(
        tmp.path(),
        &[("HF_ENDPOINT", &endpoint)],
        &[
            "--backend",
            "llama",
            "--model",
            "someone/repo",
            "--model-file",
            "x.gguf",
        ],
    );
    assert_usage_error(&o, "cannot reach the Hugging Face Hub");
}

/// Answers every request with `status` until the test ends.
fn stand_in_hub(status: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "{\"error\":\"stand-in\"}";
            let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    format!("http://{addr}")
}

#[test]
fn gated_repo_without_token() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = stand_in_hub("401 Unauthorized");
    let o = trace(
        tmp.path(),
        &[("HF_ENDPOINT", &endpoint)],
        &[
            "--backend",
            "llama",
            "--model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--model-file",
            "x.gguf",
        ],
    );
    assert_usage_error(&o, "is gated or private");
    assert!(common::stderr(&o).contains("set HF_TOKEN"));
}

#[test]
fn missing_file_in_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = stand_in_hub("404 Not Found");
    let o = trace(
        tmp.path(),
        &[("HF_ENDPOINT", &endpoint)],
        &[
            "--backend",
            "llama",
            "--model",
            "someone/repo",
            "--model-file",
            "nope.gguf",
        ],
    );
    assert_usage_error(&o, "nope.gguf not found in someone/repo");
}

#[test]
fn unknown_alias_or_path() {
    let tmp = tempfile::tempdir().unwrap();
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--backend", "llama", "--model", "no-such-model"],
    );
    assert_usage_error(&o, "logitprobe models");
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--backend", "onnx", "--model", "phi-2"],
    );
    assert_usage_error(&o, "phi-2 has no onnx build in the catalogue");
}

#[test]
fn models_lists_the_catalogue_and_what_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    cache_repo(
        tmp.path(),
        "TheBloke/phi-2-GGUF",
        &[("phi-2.Q4_K_M.gguf", &tiny("tiny-f32.gguf"))],
    );
    let o = bin()
        .env("HF_HOME", tmp.path())
        .env_remove("HF_HUB_CACHE")
        .arg("models")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for alias in [
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-7b",
        "tinyllama",
        "phi-2",
        "llama-3.1-8b",
    ] {
        assert!(out.contains(alias), "{alias} missing from:\n{out}");
    }
    assert!(out.contains("phi-2.Q4_K_M.gguf  [cached]"), "{out}");
}

/// Issue 14 point 7: llama.cpp's `user/repo:QUANT` shorthand picks the repo's GGUF of that
/// quantization (here from the cache, offline); a quantization the repo lacks names the
/// ones it has.
#[cfg(feature = "llama")]
#[test]
fn repo_colon_quant_picks_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    cache_repo(
        tmp.path(),
        "someone/tiny-GGUF",
        &[
            ("tiny-F32.gguf", &tiny("tiny-f32.gguf")),
            ("tiny-Q8_0.gguf", &tiny("tiny-q8_0.gguf")),
        ],
    );
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--model", "someone/tiny-GGUF:q8_0"],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let run = fs::read_to_string(tmp.path().join("out/run.json")).unwrap();
    assert!(run.contains("tiny-Q8_0.gguf"), "{run}");
    let o = trace(
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--model", "someone/tiny-GGUF:Q4_K_M"],
    );
    assert_usage_error(
        &o,
        "someone/tiny-GGUF has no Q4_K_M GGUF; it has: tiny-F32.gguf, tiny-Q8_0.gguf",
    );
}
