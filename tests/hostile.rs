//! Hostile model files (issue 32, items 7 and 10): GGUF headers that claim more than the file
//! holds, chat templates that loop or grow without end, weights kept outside the model's
//! folder, and tokenizer files too big, endless or too deep. Each is refused on one line with
//! exit 2 within a time limit, under a cap on the address space that the tiny models run well
//! inside (they run in 256 MiB): an allocation the file asks for fails the run.

mod common;
#[path = "common/onnx_data.rs"]
mod onnx_data;

use common::gguf::{array_value, nested_array_value, raw_header, raw_kv, tensor_entry, Gguf, Val};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// The address space a run may take.
const MEMORY: u64 = 512 << 20;

/// Runs logitprobe with `args` under an address-space cap of [`MEMORY`]; a run past `limit` is
/// killed and fails the test.
fn run_capped(args: &[&str], limit: Duration) -> Output {
    let mut cmd = common::bin();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    common::cap_address_space(&mut cmd, MEMORY);
    let mut child = cmd.spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            r.read_to_end(&mut b).ok();
            b
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = common::wait_or_kill(&mut child, limit)
        .unwrap_or_else(|| panic!("logitprobe {args:?} still ran after {limit:?}"));
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `args` end in a one-line error naming `needle`, exit 2, within a minute.
fn refused(args: &[&str], needle: &str) {
    common::assert_usage_error(&run_capped(args, Duration::from_secs(60)), needle);
}

fn inspect(path: &Path, needle: &str) {
    refused(&["inspect", "--model", path.to_str().unwrap()], needle);
}

/// `trace` of one prompt on `model`, with `extra` flags.
fn trace(model: &Path, out: &Path, extra: &[&str], needle: &str) {
    let mut args = vec![
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--threads",
        "1",
        "--no-plots",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    refused(&args, needle);
    assert!(!out.join("adaptive_token_trace.json").exists());
}

#[test]
fn gguf_headers_that_claim_more_than_the_file_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: Vec<u8>| -> PathBuf {
        let p = tmp.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    // 2^24 tensors passed the old bound, and reserving their entries took a gigabyte.
    inspect(
        &file("tensors.gguf", raw_header(1 << 24, 0, &[])),
        "16777216 tensors and 0 keys, more than the 0 bytes after them hold",
    );
    // 4 × 2^62 bytes wrapped around to 0: the array was read as empty.
    inspect(
        &file(
            "wrap.gguf",
            raw_header(0, 1, &raw_kv("a", 9, &array_value(4, 1 << 62, &[]))),
        ),
        "an array of 4611686018427387904 elements, more than the 0 bytes left in the file hold",
    );
    // Reading each level of nesting recursed: the stack overflowed.
    inspect(
        &file(
            "nested.gguf",
            raw_header(0, 1, &raw_kv("a", 9, &nested_array_value(1_000_000))),
        ),
        "an array of arrays, which llama.cpp does not read",
    );
    // 2^62 F32 elements are 2^64 bytes: the tensor's end wrapped to its start.
    let mut t = raw_header(1, 0, &tensor_entry("w", &[1 << 62], 0, 0));
    t.resize(256, 0);
    inspect(
        &file("tensor.gguf", t),
        "tensor w (dimensions [4611686018427387904], offset 0) ends past any file",
    );
    // The same refusal on the way to llama.cpp.
    trace(
        &tmp.path().join("tensors.gguf"),
        &tmp.path().join("out"),
        &[],
        "16777216 tensors",
    );
}

/// The tiny GGUF with `template` as its chat template.
fn with_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let mut g = Gguf::read(&common::tiny("tiny-q8_0.gguf"));
    g.set(
        "tokenizer.chat_template",
        Val::Str(template.as_bytes().to_vec()),
    );
    let p = dir.join(name);
    g.write(&p);
    p
}

#[test]
fn hostile_chat_templates_stop_in_bounded_time_and_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let chat = ["--use-chat-template"];
    // 10^10 steps: hours.
    trace(
        &with_template(
            tmp.path(),
            "loop.gguf",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
        &out,
        &chat,
        "the model's chat template runs past 20000000 steps, a loop without end; give a chat template of your own, or render the prompt without one",
    );
    // A terabyte of output, 10 MB at a time.
    trace(
        &with_template(
            tmp.path(),
            "grow.gguf",
            "{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        ),
        &out,
        &chat,
        "the model's chat template writes more than",
    );
    // A string doubled 40 times, never written out: a terabyte held.
    trace(
        &with_template(
            tmp.path(),
            "double.gguf",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        ),
        &out,
        &chat,
        "MiB of memory for",
    );
    // 2 MiB of template, rendered as it came.
    let big = "{{ bos_token }}".repeat((2 << 20) / 15);
    trace(
        &with_template(tmp.path(), "big.gguf", &big),
        &out,
        &chat,
        "more than the 1 MiB a chat template may hold",
    );
    trace(
        &with_template(
            tmp.path(),
            "recursion.gguf",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ),
        &out,
        &chat,
        "recursion limit exceeded",
    );
}

#[test]
fn weights_kept_outside_the_model_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside.bin");
    let case = |name: &str, location: &str| -> PathBuf {
        let dst = tmp.path().join(name);
        let (_, data) = onnx_data::copy_with_external(&common::tiny("optimum"), &dst, location);
        fs::write(&outside, &data).unwrap();
        fs::write(dst.join("weights.bin"), &data).unwrap();
        dst
    };
    let out = tmp.path().join("out");
    let onnx = ["--backend", "onnx"];
    // The same weights inside the folder run.
    let o = run_capped(
        &[
            "trace",
            "--backend",
            "onnx",
            "--model",
            case("inside", "weights.bin").to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--no-plots",
            "--out",
            tmp.path().join("out-inside").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    // ONNX Runtime 1.31 refuses these too, but only once it parses the model, and its words
    // name neither the absolute path nor a fix.
    let outside_the_folder = |location: &str, why: &str| {
        format!("tensor embed_1 keeps its data in \"{location}\", {why} outside the model's folder")
    };
    trace(
        &case("up", "../outside.bin"),
        &out,
        &onnx,
        &outside_the_folder("../outside.bin", "a path that climbs through '..'"),
    );
    let abs = outside.to_str().unwrap().to_string();
    trace(
        &case("absolute", &abs),
        &out,
        &onnx,
        &outside_the_folder(&abs, "an absolute path"),
    );
    let link = case("link", "link.bin");
    std::os::unix::fs::symlink(&outside, link.join("link.bin")).unwrap();
    trace(
        &link,
        &out,
        &onnx,
        &outside_the_folder(
            "link.bin",
            &format!("a link to {}", outside.canonicalize().unwrap().display()),
        ),
    );
}

/// A copy of the tiny ONNX export whose `file` is made by `make`.
fn folder_with(dir: &Path, name: &str, file: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let dst = dir.join(name);
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(common::tiny("optimum")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let p = dst.join(file);
    fs::remove_file(&p).ok();
    make(&p);
    dst
}

#[test]
fn tokenizer_files_too_big_endless_or_too_deep_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let onnx = ["--backend", "onnx"];
    // Sparse: a gigabyte on paper; read whole, it took a gigabyte of memory.
    let sparse = |p: &Path| fs::File::create(p).unwrap().set_len(1 << 30).unwrap();
    trace(
        &folder_with(tmp.path(), "big", "tokenizer.json", sparse),
        &out,
        &onnx,
        "tokenizer.json: it holds 1.0 GiB, more than the 128 MiB a model folder's file may hold",
    );
    trace(
        &folder_with(tmp.path(), "big-config", "config.json", sparse),
        &out,
        &onnx,
        "config.json: it holds 1.0 GiB",
    );
    // A read of /dev/zero never ends.
    trace(
        &folder_with(tmp.path(), "zero", "tokenizer.json", |p| {
            std::os::unix::fs::symlink("/dev/zero", p).unwrap()
        }),
        &out,
        &onnx,
        "tokenizer.json: it is not a regular file",
    );
    trace(
        &folder_with(tmp.path(), "deep", "tokenizer.json", |p| {
            let deep = format!(
                "{{\"model\": {}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            fs::write(p, deep).unwrap()
        }),
        &out,
        &onnx,
        "recursion limit exceeded",
    );
}
