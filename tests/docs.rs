//! Every `logitprobe` command shown in README.md and docs/ parses as written: its flags exist,
//! take the values given, and fit together (clap's own checks, with `LOGITPROBE_CHECK_ARGS`
//! set the binary stops there). Shell variables stand for paths and need not exist.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

/// The shell code blocks of a Markdown file, their lines joined where they end in `\`.
fn shell_lines(markdown: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_shell = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            in_shell = !in_shell && matches!(lang.trim(), "sh" | "bash" | "shell" | "console");
            pending.clear();
            continue;
        }
        if !in_shell {
            continue;
        }
        let code = strip_comment(line);
        if let Some(head) = code.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
        } else {
            pending.push_str(&code);
            lines.push(std::mem::take(&mut pending));
        }
    }
    lines
}

/// The line without a `#` comment (one outside quotes, at the start or after a space).
fn strip_comment(line: &str) -> String {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return line[..i].to_string(),
            _ => {}
        }
        prev = c;
    }
    line.to_string()
}

/// The `logitprobe` invocations of one shell line, as argument lists (the words after
/// `logitprobe`), cut at `;`, `&&`, `||`, `|`, `&` and `>` and with variables and command
/// substitutions replaced by a stand-in word.
fn invocations(line: &str) -> Vec<Vec<String>> {
    let line = substitutions_as_words(line).replace(['`'], "'");
    let Some(words) = shlex::split(&line) else {
        // A quoted argument over several lines (curl's JSON body): no command of ours.
        assert!(
            !line.contains("logitprobe "),
            "cannot split the shell line {line:?}"
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for w in words {
        let ends = matches!(w.as_str(), ";" | "&&" | "||" | "|" | "&" | "do" | "then")
            || w.starts_with('>')
            || w.ends_with(';');
        if ends {
            let word = w.trim_end_matches(';').to_string();
            if let Some(c) = current.as_mut() {
                if w.ends_with(';') && !word.is_empty() {
                    c.push(stand_in(&word));
                }
            }
            out.extend(current.take());
            continue;
        }
        match current.as_mut() {
            Some(c) => c.push(stand_in(&w)),
            None if w == "logitprobe" => current = Some(Vec::new()),
            None => {}
        }
    }
    out.extend(current);
    out
}

/// `line` with each command substitution `$(…)` and process substitution `<(…)`, nested
/// parentheses included, made one word `SUBST(…)` (its inside can hold spaces and quotes).
fn substitutions_as_words(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("$(").into_iter().chain(rest.find("<(")).min() {
        out.push_str(&rest[..at]);
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest[at + 1..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + 1 + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push_str("SUBST()");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A word with each `$VAR`, `${VAR}` and substitution replaced by a plain name.
fn stand_in(word: &str) -> String {
    if word.contains("SUBST(") {
        return "1".into();
    }
    let mut s = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            let braced = chars.peek() == Some(&'{');
            if braced {
                chars.next();
            }
            let mut name = String::new();
            while let Some(&n) = chars.peek() {
                if n.is_alphanumeric() || n == '_' {
                    name.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            if braced {
                chars.next();
            }
            // Loop counters stand in for shard numbers (`--shard $k/2`).
            s.push_str(if name.len() == 1 { "0" } else { "var" });
        } else {
            s.push(c);
        }
    }
    s
}

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

#[test]
fn every_documented_command_parses() {
    let mut checked = 0;
    let mut failed = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for line in shell_lines(&text) {
            for args in invocations(&line) {
                let out = common::bin()
                    .args(&args)
                    .env("LOGITPROBE_CHECK_ARGS", "1")
                    .output()
                    .unwrap();
                checked += 1;
                if !out.status.success() {
                    failed.push(format!(
                        "{}: logitprobe {}\n  {}",
                        page.file_name().unwrap().to_string_lossy(),
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
    }
    assert!(
        checked >= 30,
        "found only {checked} commands in README.md and docs/"
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn the_readme_links_every_docs_page_and_stays_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.lines().count() <= 250,
        "README.md is {} lines: the front door stays at 250 or fewer, details go in docs/",
        readme.lines().count()
    );
    for page in pages().iter().skip(1) {
        let name = page.file_name().unwrap().to_string_lossy();
        assert!(
            readme.contains(&format!("(docs/{name}")),
            "README.md does not link docs/{name}"
        );
    }
}

#[test]
fn relative_links_and_pictures_resolve() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')').collect();
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            if !dir.join(path).exists() {
                broken.push(format!(
                    "{}: {target}",
                    page.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to nothing:\n{}",
        broken.join("\n")
    );
}
