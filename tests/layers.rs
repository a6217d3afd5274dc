//! The library's layers point down only, nothing imports in a circle, and the library never
//! names a command-line flag.
//!
//! Reads the sources as text: each `crate::name` path outside comments, strings and
//! `#[cfg(test)]` modules is an import of module `name`. `pub use` lines re-export (a facade,
//! not a dependency) and are left out of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// `src/`'s top-level modules, lowest layer first: a module may import only from the ones
/// before it.
const LAYERS: &[&str] = &[
    "util", "hub", "dist", "text", "lens", "schema", "generate", "report", "output", "compare",
    "cluster", "serve",
];

/// Binary-only modules: clap's arguments and the commands that turn them into library calls.
const BINARY: &[&str] = &["main.rs", "cli", "commands"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source less its `#[cfg(test)] mod NAME { ... }` blocks (braces counted; the test
/// modules this project writes hold no unbalanced brace in a string).
fn without_test_modules(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("#[cfg(test)]\nmod ") {
        out.push_str(&rest[..i]);
        let block = &rest[i..];
        let Some(open) = block.find('{') else {
            rest = "";
            break;
        };
        let mut depth = 0usize;
        let mut end = block.len();
        for (j, c) in block[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &block[end..];
    }
    out.push_str(rest);
    out
}

/// The source without comments, the contents of string and char literals, and the
/// `#[cfg(test)]` items (test modules may use anything).
fn code_only(src: &str) -> String {
    let src = &without_test_modules(src);
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' || b[i..].starts_with(b"r#\"") || b[i..].starts_with(b"r\"") {
            let (close, start): (&[u8], usize) = if b[i] == b'r' && b[i + 1] == b'#' {
                (b"\"#", 3)
            } else if b[i] == b'r' {
                (b"\"", 2)
            } else {
                (b"\"", 1)
            };
            i += start;
            while i < b.len() && !b[i..].starts_with(close) {
                if b[i] == b'\\' && start == 1 {
                    i += 1;
                }
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The string literals of the source (outside `#[cfg(test)]` modules), escapes kept as written.
fn string_literals(src: &str) -> Vec<String> {
    let src = &without_test_modules(src);
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'\'' {
            // A char literal ('"' among them) or a lifetime: skip the quote and what it holds.
            if i + 2 < b.len() && b[i + 1] == b'\\' {
                i += 4;
            } else if i + 2 < b.len() && b[i + 2] == b'\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if b[i] == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push(String::from_utf8_lossy(&b[start..i.min(b.len())]).into_owned());
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// The modules a piece of code imports through `crate::name` (not in `pub use` lines).
fn imports(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in code.lines() {
        if line.trim_start().starts_with("pub use ") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The module a file belongs to, `depth` levels below `root` (`a/b/c.rs` at depth 1: `a`; at
/// depth 2: `a/b`), or `None` for files above that depth.
fn module_of(root: &Path, file: &Path, depth: usize) -> Option<String> {
    let rel = file.strip_prefix(root).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.len() < depth {
        return None;
    }
    let mut m: Vec<String> = parts[..depth].to_vec();
    if m.last().is_some_and(|l| l == "mod") {
        m.pop();
    }
    Some(m.join("/")).filter(|s| !s.is_empty())
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|p| p == m).unwrap();
                    let mut cycle = path[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn is_binary(root: &Path, file: &Path) -> bool {
    let first = file.strip_prefix(root).unwrap().iter().next().unwrap();
    BINARY.iter().any(|b| first == *b)
}

/// The modules named by each `crate::a::b` path of `code`, at `depth` (1: `a`; 2: `a/b` where
/// that is a module file, else `a`'s own items); `alias` maps a name imported from the crate
/// root to the module it is re-exported from.
fn imported_modules(
    src: &Path,
    code: &str,
    depth: usize,
    alias: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in imports(code) {
        let name = alias.get(&name).cloned().unwrap_or(name);
        if depth == 1 {
            out.insert(name);
            continue;
        }
        let pat = format!("crate::{name}::");
        for line in code
            .lines()
            .filter(|l| !l.trim_start().starts_with("pub use "))
        {
            for (i, _) in line.match_indices(&pat) {
                let sub: String = line[i + pat.len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let module = format!("{name}/{sub}");
                if src.join(format!("{module}.rs")).is_file()
                    || src.join(&module).join("mod.rs").is_file()
                {
                    out.insert(module);
                }
            }
        }
    }
    out
}

/// Import edges between modules at `depth` under `src`, library files only.
fn graph(
    src: &Path,
    depth: usize,
    alias: &BTreeMap<String, String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files.iter().filter(|f| !is_binary(src, f)) {
        let Some(from) = module_of(src, f, depth).filter(|m| m != "lib") else {
            continue;
        };
        let code = code_only(&fs::read_to_string(f).unwrap());
        let to = imported_modules(src, &code, depth, alias);
        g.entry(from.clone())
            .or_default()
            .extend(to.into_iter().filter(|m| *m != from));
    }
    g
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn src_layers_only_import_downward() {
    let src = root().join("src");
    let g = graph(&src, 1, &BTreeMap::new());
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    for (from, tos) in &g {
        let Some(rf) = rank(from) else {
            wrong.push(format!("{from} is in no layer: add it to LAYERS"));
            continue;
        };
        for to in tos {
            match rank(to) {
                Some(rt) if rt < rf => {}
                Some(_) => wrong.push(format!("{from} imports {to}, a layer above it")),
                None => wrong.push(format!("{from} imports {to}, which is in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_import_cycles_among_src_modules() {
    let src = root().join("src");
    let top = graph(&src, 1, &BTreeMap::new());
    assert_eq!(find_cycle(&top), None, "top-level modules of src/");
    // Inside each layer too: the probe's helpers import the row types from `dist::row`, not
    // from the probe that coordinates them.
    let inner = graph(&src, 2, &BTreeMap::new());
    assert_eq!(find_cycle(&inner), None, "modules inside src/'s layers");
}

#[test]
fn no_import_cycles_among_backend_modules() {
    let src = root().join("backends/src");
    // What lib.rs re-exports: `crate::Error` is the `error` module.
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut alias = BTreeMap::new();
    let flat = lib.replace('\n', " ");
    for part in flat.split("pub use ").skip(1) {
        let stmt = part.split(';').next().unwrap();
        let Some((module, items)) = stmt.split_once("::") else {
            continue;
        };
        for item in items
            .trim_matches(|c: char| c == '{' || c == '}' || c.is_whitespace())
            .split(',')
        {
            let item = item.trim();
            if !item.is_empty() {
                alias.insert(item.to_string(), module.trim().to_string());
            }
        }
    }
    // `usage!` is defined in error.rs (macro_export puts it at the root).
    alias.insert("usage".into(), "error".into());
    let g = graph(&src, 1, &alias);
    assert!(g.contains_key("source") && g.contains_key("error"), "{g:?}");
    for (from, tos) in &g {
        for to in tos {
            assert!(
                src.join(format!("{to}.rs")).is_file() || src.join(to).is_dir(),
                "{from} imports crate::{to}, which is no module of backends/src (re-export it from its module in lib.rs)"
            );
        }
    }
    assert_eq!(find_cycle(&g), None, "modules of backends/src");
}

#[test]
fn the_command_line_lives_in_the_binary() {
    let lib = fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let code = code_only(&lib);
    for m in ["cli", "commands"] {
        assert!(
            !code.contains(&format!("mod {m}")),
            "src/lib.rs declares `{m}`: it belongs to the binary (src/main.rs)"
        );
    }
    let main = code_only(&fs::read_to_string(root().join("src/main.rs")).unwrap());
    assert!(main.contains("mod cli;") && main.contains("mod commands;"));
}

/// Whether a string is another program's command line: sbatch's options in the job scripts
/// and commands that `slurm` writes, submits and suggests share names with ours (`--time`).
fn names_sbatch(s: &str) -> bool {
    s.contains("SBATCH") || s.contains("sbatch ")
}

/// Long flags of logitprobe's own command line, read from its clap definitions: each
/// `#[arg(...)]` with `long` names the field below it, or the name it gives.
fn our_flags() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&root().join("src/cli"), &mut files);
    let mut flags = BTreeSet::new();
    for f in files {
        let text = fs::read_to_string(f).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("#[arg(") {
            rest = &rest[i..];
            let end = rest.find(")]\n").unwrap_or(rest.len());
            let attr = &rest[..end];
            rest = &rest[end..];
            let words: Vec<&str> = attr
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .collect();
            if !words.contains(&"long") {
                continue;
            }
            let named = attr.find("long = \"").map(|j| {
                attr[j + 8..]
                    .chars()
                    .take_while(|c| *c != '"')
                    .collect::<String>()
            });
            let field = rest.find("pub ").map(|j| {
                rest[j + 4..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            });
            if let Some(name) = named.or(field.map(|f| f.replace('_', "-"))) {
                flags.insert(format!("--{name}"));
            }
        }
    }
    flags
}

#[test]
fn library_strings_name_no_command_line_flag() {
    let ours = our_flags();
    assert!(
        ours.contains("--model") && ours.contains("--out") && ours.len() > 40,
        "read too few flags from src/cli: {ours:?}"
    );
    let mut found = Vec::new();
    for dir in ["src", "backends/src"] {
        let base = root().join(dir);
        let mut files = Vec::new();
        rust_files(&base, &mut files);
        for f in files.iter().filter(|f| !is_binary(&base, f)) {
            for s in string_literals(&fs::read_to_string(f).unwrap()) {
                for (i, _) in s.match_indices("--") {
                    if i > 0 && s.as_bytes()[i - 1].is_ascii_alphanumeric() {
                        continue;
                    }
                    let flag: String = s[i..]
                        .chars()
                        .take_while(|c| *c == '-' || c.is_ascii_alphanumeric())
                        .collect();
                    if ours.contains(&flag) && !names_sbatch(&s) {
                        found.push(format!("{}: {flag} in {s:?}", f.display()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "library strings name command-line flags (the binary maps errors to flags):\n{}",
        found.join("\n")
    );
}
