//! The serve soak's 60-second version (`scripts/soak`, whose full run is 30 minutes on
//! SmolLM2 and not part of CI): 8 clients on loopback against the tiny GGUF, mixing every
//! request kind, valid and not. The script itself decides pass or fail (no valid request
//! failed, every invalid one refused with a 4xx OpenAI error, no 503, RSS growth after the
//! warm-up within 5 %, a clean SIGINT exit); latency is printed, never asserted, since CI
//! machines are shared.

use std::path::Path;
use std::process::Command;

#[test]
fn serve_soak_60_seconds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let figures = tmp.path().join("soak.json");
    let out = Command::new("python3")
        .arg(root.join("scripts/soak"))
        .args(["--seconds", "60", "--model", "tiny", "--clients", "8"])
        .args(["--binary", env!("CARGO_BIN_EXE_logitprobe")])
        .arg("--json")
        .arg(&figures)
        .output()
        .expect("run scripts/soak with python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/soak failed:\n{text}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    // A soak that ran nothing would pass too: every kind must have been answered, over rounds.
    for (kind, k) in v["kinds"].as_object().unwrap() {
        assert!(
            k["ok"].as_u64().unwrap() > 0,
            "no {kind} request succeeded:\n{text}"
        );
    }
    assert!(v["rounds"].as_u64().unwrap() >= 8, "{text}");
    println!("{text}");
}
