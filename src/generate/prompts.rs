//! Where prompts come from and how they become token ids.
//!
//! Every prompt has a global index: its line in a prompts file (0-based; blank lines keep
//! their number but hold no prompt) or its position among the prompts given on the command
//! line. A file is read line by line as the loop needs prompts, never whole, so its size does
//! not bound anything; [`PromptsFile::scan`] reads it once first to check every line and to
//! count them. A stream (standard input, a pipe, `<(jq …)`, a FIFO) cannot be read twice: it
//! is copied to a temporary file as it is scanned, and read from there.

use crate::generate::PromptInput;
use crate::text::chat;
use logitprobe_backends::{usage, TokenId, Vocab};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One prompt before rendering: its index, text and system message.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSpec {
    pub index: usize,
    pub prompt: String,
    pub system_prompt: Option<String>,
}

/// A prompts file that cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptsFileError {
    #[error("cannot read prompts file {}: {reason}", .path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("prompts file {} is not a regular file; give a text or JSONL file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("prompts file {} is a FIFO that nothing wrote to in {} s; start the program that writes it first, or give a regular file", .path.display(), .waited.as_secs())]
    NoWriter { path: PathBuf, waited: Duration },
    #[error("standard input is a terminal; pipe the prompts in, or give a file")]
    Terminal,
    #[error("prompts stream {} holds more than {} GiB; write the prompts to a file and give its path", .path.display(), STREAM_LIMIT >> 30)]
    StreamTooLarge { path: PathBuf },
}

/// The path that means standard input.
pub const STDIN: &str = "-";

/// How long a stream may stay silent before its first byte (a FIFO no program writes).
pub const STREAM_WAIT: Duration = Duration::from_secs(10);

/// The most a stream is copied to disk (a `yes |` would fill it).
pub const STREAM_LIMIT: u64 = 4 << 30;

/// A prompts file, checked: one prompt per line, or JSONL objects with `prompt` and
/// optional `system_prompt`.
#[derive(Debug, Clone)]
pub struct PromptsFile {
    /// The path given (`-` for standard input).
    pub path: PathBuf,
    /// A stream's copy, which the lines are read from (deleted with the last clone).
    spool: Option<Arc<tempfile::NamedTempFile>>,
    /// Lines in the file (blank ones included): the index space.
    pub lines: usize,
    /// Lines that hold a prompt.
    pub prompts: usize,
    /// The first line (0-based) whose JSONL object has its own `system_prompt`.
    pub first_system_line: Option<usize>,
    pub default_system: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    prompt: String,
    system_prompt: Option<String>,
}

impl PromptsFile {
    /// Reads the file once, line by line: every line must parse; the lines are counted.
    pub fn scan(path: &Path, default_system: Option<&str>) -> anyhow::Result<Self> {
        let spool = match stream_kind(path)? {
            Some(stdin) => Some(Arc::new(spool(path, stdin)?)),
            None => None,
        };
        let mut f = PromptsFile {
            path: path.to_path_buf(),
            spool,
            lines: 0,
            prompts: 0,
            first_system_line: None,
            default_system: default_system.map(String::from),
        };
        let (mut lines, mut prompts, mut first_system_line) = (0, 0, None);
        for item in f.lines()? {
            let (n, spec) = item?;
            lines = n + 1;
            if let Some(spec) = spec {
                prompts += 1;
                if spec.system_prompt.is_some() {
                    first_system_line.get_or_insert(n);
                }
            }
        }
        (f.lines, f.prompts, f.first_system_line) = (lines, prompts, first_system_line);
        Ok(f)
    }

    fn unreadable(&self, e: std::io::Error) -> PromptsFileError {
        PromptsFileError::Unreadable {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Where the prompts can be read again: the file, or a stream's copy (its sha256 is the
    /// prompts').
    pub fn readable_path(&self) -> &Path {
        self.spool.as_ref().map_or(&self.path, |s| s.path())
    }

    fn open(&self) -> anyhow::Result<BufReader<File>> {
        if let Some(spool) = &self.spool {
            let file = spool.reopen().map_err(|e| self.unreadable(e))?;
            return Ok(BufReader::with_capacity(1 << 16, file));
        }
        let meta = std::fs::metadata(&self.path).map_err(|e| self.unreadable(e))?;
        if !meta.is_file() {
            return Err(PromptsFileError::NotAFile {
                path: self.path.clone(),
            }
            .into());
        }
        let file = File::open(&self.path).map_err(|e| self.unreadable(e))?;
        Ok(BufReader::with_capacity(1 << 16, file))
    }

    /// Every line with its number, parsed (`None` for a blank one), system messages as the
    /// file writes them.
    fn lines(
        &self,
    ) -> anyhow::Result<impl Iterator<Item = anyhow::Result<(usize, Option<PromptSpec>)>> + '_>
    {
        let reader = self.open()?;
        Ok(reader.split(b'\n').enumerate().map(move |(n, line)| {
            let line = line.map_err(|e| self.unreadable(e))?;
            Ok((n, self.parse_line(n, &line)?))
        }))
    }

    /// The prompts, in file order, read as they are asked for.
    pub fn iter(&self) -> anyhow::Result<impl Iterator<Item = anyhow::Result<PromptSpec>> + '_> {
        Ok(self.lines()?.filter_map(move |item| match item {
            Ok((_, None)) => None,
            Ok((_, Some(mut spec))) => {
                spec.system_prompt = spec.system_prompt.or_else(|| self.default_system.clone());
                Some(Ok(spec))
            }
            Err(e) => Some(Err(e)),
        }))
    }

    fn parse_line(&self, n: usize, line: &[u8]) -> anyhow::Result<Option<PromptSpec>> {
        let shown = self.path.display();
        let mut line = line.strip_suffix(b"\r").unwrap_or(line);
        if n == 0 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        let text = std::str::from_utf8(line).map_err(|e| {
            usage!(
                "{shown} line {}: not UTF-8 ({e}); save the prompts file as UTF-8",
                n + 1
            )
        })?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let (prompt, system_prompt) = if text.trim_start().starts_with('{') {
            let row: Row = serde_json::from_str(text).map_err(|e| {
                usage!(
                    "{shown} line {}: not a JSONL prompt ({e}); use {{\"prompt\": \"...\", \"system_prompt\": \"...\"}}",
                    n + 1
                )
            })?;
            (row.prompt, row.system_prompt)
        } else {
            (text.to_string(), None)
        };
        if prompt.is_empty() {
            return Err(usage!(
                "{shown} line {}: the prompt is empty; give it some text or delete the line",
                n + 1
            ));
        }
        Ok(Some(PromptSpec {
            index: n,
            prompt,
            system_prompt,
        }))
    }
}

/// Whether `path` is a stream to copy first: `Some(true)` for standard input, `Some(false)`
/// for a pipe or FIFO, `None` for anything else (a regular file is read in place; the rest
/// is refused when opened).
fn stream_kind(path: &Path) -> Result<Option<bool>, PromptsFileError> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str() == STDIN {
        // SAFETY: isatty only reads the descriptor's state.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            return Err(PromptsFileError::Terminal);
        }
        return Ok(Some(true));
    }
    Ok(std::fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_fifo())
        .then_some(false))
}

/// Copies a stream into a temporary file. The wait for its first byte is bounded: a FIFO
/// that no program opens for writing would block the open, and then the read, forever.
fn spool(path: &Path, stdin: bool) -> Result<tempfile::NamedTempFile, PromptsFileError> {
    let unreadable = |e: std::io::Error| PromptsFileError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut input: Box<dyn Read> = if stdin {
        wait_readable(libc::STDIN_FILENO, path)?;
        Box::new(std::io::stdin().lock())
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        // Non-blocking, the open returns at once with or without a writer.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(unreadable)?;
        wait_readable(f.as_raw_fd(), path)?;
        // SAFETY: F_GETFL and F_SETFL on a descriptor this function owns.
        unsafe {
            let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        Box::new(f)
    };
    let mut spool = tempfile::NamedTempFile::new().map_err(unreadable)?;
    let copied = std::io::copy(&mut (&mut input).take(STREAM_LIMIT + 1), &mut spool)
        .and_then(|n| spool.flush().map(|()| n))
        .map_err(unreadable)?;
    if copied > STREAM_LIMIT {
        return Err(PromptsFileError::StreamTooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(spool)
}

/// Waits until `fd` has a byte or its end to read, at most [`STREAM_WAIT`]. A FIFO that never
/// had a writer reports neither (Linux), so silence means no writer.
fn wait_readable(fd: std::os::unix::io::RawFd, path: &Path) -> Result<(), PromptsFileError> {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + STREAM_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: one valid pollfd, and its count.
        let n = unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int) };
        match n {
            1.. => return Ok(()),
            0 => {
                return Err(PromptsFileError::NoWriter {
                    path: path.to_path_buf(),
                    waited: STREAM_WAIT,
                })
            }
            // A signal (Ctrl-C is handled, not fatal) wakes the wait: the interrupt flag
            // is the loop's to check, this waits out its time.
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => {
                return Err(PromptsFileError::Unreadable {
                    path: path.to_path_buf(),
                    reason: std::io::Error::last_os_error().to_string(),
                })
            }
        }
    }
}

/// Prompts of a run: from the command line, or from a file.
#[derive(Debug, Clone)]
pub enum PromptList {
    Given(Vec<PromptSpec>),
    File(PromptsFile),
}

impl PromptList {
    /// How many prompts the run has.
    pub fn len(&self) -> usize {
        match self {
            PromptList::Given(v) => v.len(),
            PromptList::File(f) => f.prompts,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the index space (a file's line count).
    pub fn index_space(&self) -> usize {
        match self {
            PromptList::Given(v) => v.len(),
            PromptList::File(f) => f.lines,
        }
    }

    /// The prompts in index order, read as they are asked for.
    pub fn iter(
        &self,
    ) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<PromptSpec>> + '_>> {
        Ok(match self {
            PromptList::Given(v) => Box::new(v.iter().cloned().map(Ok)),
            PromptList::File(f) => Box::new(f.iter()?),
        })
    }
}

/// How prompt text becomes tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptFormat {
    /// Wrap each prompt in a chat template.
    pub use_chat_template: bool,
    /// A chat template (Jinja source) that replaces the model's own.
    #[serde(skip)]
    pub chat_template: Option<String>,
    /// Special-token text in a plain prompt (`<start_of_turn>`) becomes its id, as llama.cpp
    /// and Hugging Face tokenize by default; off, it is tokenized as text.
    pub parse_special: bool,
}

impl Default for PromptFormat {
    fn default() -> Self {
        PromptFormat {
            use_chat_template: false,
            chat_template: None,
            parse_special: true,
        }
    }
}

impl PromptFormat {
    /// A plain or chat-templated prompt with the model's own template, specials parsed.
    pub fn chat(use_chat_template: bool) -> Self {
        PromptFormat {
            use_chat_template,
            ..Default::default()
        }
    }
}

/// Renders (chat template) and tokenizes one prompt with the source's own rules.
pub fn prepare(
    source: &dyn Vocab,
    spec: &PromptSpec,
    format: &PromptFormat,
) -> anyhow::Result<PromptInput> {
    let use_chat_template = format.use_chat_template;
    let (rendered, parse_special) = if use_chat_template {
        let messages = chat::messages(&spec.prompt, spec.system_prompt.as_deref());
        let rendered = match &format.chat_template {
            Some(t) => chat::render_with(source, t, &messages)?,
            None => chat::render_for(source, &spec.prompt, spec.system_prompt.as_deref())?,
        };
        // A template writes special tokens: they are always parsed.
        (rendered, true)
    } else {
        (spec.prompt.clone(), format.parse_special)
    };
    let ids = tokenize_prompt(source, &rendered, use_chat_template, parse_special)?;
    Ok(PromptInput {
        index: spec.index,
        prompt: spec.prompt.clone(),
        system_prompt: spec.system_prompt.clone(),
        rendered,
        ids,
        ..Default::default()
    })
}

/// Token ids of a prompt text with the model's own BOS rule; text a chat template rendered
/// (`templated`) gets no second BOS when it starts with one.
pub fn tokenize_prompt(
    source: &dyn Vocab,
    rendered: &str,
    templated: bool,
    parse_special: bool,
) -> anyhow::Result<Vec<TokenId>> {
    let info = source.info();
    // A chat template writes its own BOS where the model wants one.
    let add_bos = info.add_bos
        && !(templated
            && info.bos.is_some_and(|b| {
                source
                    .token_bytes(b)
                    .is_some_and(|bytes| rendered.as_bytes().starts_with(&bytes))
            }));
    source.tokenize(rendered, add_bos, parse_special)
}

/// Specs rendered and tokenized as the loop takes them.
pub struct Prepared<I> {
    pub specs: I,
    pub format: PromptFormat,
}

impl<I: Iterator<Item = anyhow::Result<PromptSpec>>> crate::generate::Prompts for Prepared<I> {
    fn next_prompt(
        &mut self,
        source: &dyn Vocab,
        _idle: bool,
    ) -> Option<anyhow::Result<PromptInput>> {
        let spec = self.specs.next()?;
        Some(spec.and_then(|s| prepare(source, &s, &self.format)))
    }
}

/// Renders and tokenizes prompts given as (prompt, system message) pairs, indexed in order.
pub fn prepare_prompts(
    source: &dyn Vocab,
    prompts: &[(String, Option<String>)],
    format: &PromptFormat,
) -> anyhow::Result<Vec<PromptInput>> {
    prompts
        .iter()
        .enumerate()
        .map(|(index, (p, sys))| {
            let spec = PromptSpec {
                index,
                prompt: p.clone(),
                system_prompt: sys.clone(),
            };
            prepare(source, &spec, format)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.jsonl");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn indices_are_line_numbers_and_blank_lines_keep_theirs() {
        let (_d, p) = file("\u{feff}a\n\n{\"prompt\": \"b\", \"system_prompt\": \"s\"}\r\nc");
        let f = PromptsFile::scan(&p, None).unwrap();
        assert_eq!((f.lines, f.prompts), (4, 3));
        assert_eq!(f.first_system_line, Some(2));
        let got: Vec<PromptSpec> = f.iter().unwrap().map(Result::unwrap).collect();
        assert_eq!(
            got[0].prompt, "a",
            "a byte-order mark is not part of the prompt"
        );
        assert_eq!(got[1].index, 2);
        assert_eq!(got[1].system_prompt.as_deref(), Some("s"));
        assert_eq!((got[2].index, got[2].prompt.as_str()), (3, "c"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let (_d, p) = file("a\n{\"prompt\": \"x\", \"system\": \"y\"}\n");
        let e = PromptsFile::scan(&p, None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("unknown field"), "{e}");
        let (_d, p) = file("a\n{\"prompt\": 1\n");
        let e = PromptsFile::scan(&p, None).unwrap_err().to_string();
        assert!(e.contains("line 2: not a JSONL prompt"), "{e}");
    }
}
