//! `scripts/setup --check` finds each requirement the way the build does, checked against
//! folders laid out like a fresh machine of the CI image.

use std::fs;
use std::path::Path;
use std::process::Command;

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, "").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn check(root: &Path) -> (bool, String) {
    let o = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup"))
        .arg("--check")
        .env("SETUP_ROOT", root)
        .env_remove("LIBCLANG_PATH")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"))
}

#[test]
fn the_ci_images_libclang_cpp_is_not_libclang() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for cmd in [
        "usr/bin/cmake",
        "usr/bin/c++",
        "usr/bin/python3",
        "usr/bin/chromium",
        "usr/sbin/munged",
        "usr/sbin/slurmctld",
        "usr/sbin/slurmd",
        "usr/bin/sbatch",
    ] {
        touch(root, cmd);
    }
    touch(root, "usr/lib/python3.11/ensurepip/__init__.py");
    // What the image ships: the C++ interface only.
    touch(root, "usr/lib/llvm-14/lib/libclang-cpp.so.14");
    touch(root, "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    let (ok, out) = check(root);
    assert!(!ok, "a missing requirement fails the check:\n{out}");
    assert!(
        line(&out, "libclang").contains("missing (Debian package libclang-dev)"),
        "{out}"
    );
    for name in [
        "cmake",
        "c++ compiler",
        "python3 venv",
        "chromium",
        "munge",
        "slurm",
    ] {
        assert!(line(&out, name).contains("found"), "{name}: {out}");
    }
    // What libclang-dev installs: a name clang-sys loads.
    touch(root, "usr/lib/llvm-14/lib/libclang-14.so.1");
    let (ok, out) = check(root);
    assert!(ok, "{out}");
    assert!(
        line(&out, "libclang").ends_with("usr/lib/llvm-14/lib/libclang-14.so.1"),
        "{out}"
    );
}

#[test]
fn every_requirement_gets_a_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out) = check(tmp.path());
    assert!(!ok);
    for name in [
        "cmake",
        "c++ compiler",
        "libclang",
        "python3 venv",
        "chromium",
        "munge",
        "slurm",
    ] {
        assert!(line(&out, name).contains("missing"), "{name}: {out}");
    }
}
