//! Chat templates: the model's own Jinja template, rendered by one renderer (minijinja) for
//! every engine, so the same messages give the same prompt text and ids whatever the engine.

use crate::util::budget::{self, RunError};
use logitprobe_backends::{usage, Vocab};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The messages of one prompt: an optional system message, then the user's.
pub fn messages(prompt: &str, system_prompt: Option<&str>) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system_prompt {
        m.push(Message {
            role: "system".into(),
            content: s.into(),
        });
    }
    m.push(Message {
        role: "user".into(),
        content: prompt.into(),
    });
    m
}

/// The most Jinja source a chat template may hold. Real templates are a few kilobytes (Qwen3's,
/// tool calls and all, is 4 KB); a 50 MB one took 22 s and 3 GB to parse.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// The steps (minijinja's fuel) one rendering may take. A real template takes some 70 per
/// message (Qwen3's, with its pass over the messages in reverse), so 20 million renders
/// conversations of 100,000s of messages, and a loop that never ends stops within a second.
pub const MAX_TEMPLATE_STEPS: u64 = 20_000_000;

/// What a rendering may write beyond four times its input (messages, BOS and EOS text): a
/// template writes each message about once, around a few kilobytes of its own.
const OUTPUT_SLACK: usize = 16 << 20;

/// Whose template is rendered: the words its errors use and the fix they name.
#[derive(Debug, Clone, Copy)]
enum Whose {
    Model,
    Given,
}

impl Whose {
    fn name(self) -> &'static str {
        match self {
            Whose::Model => "the model's chat template",
            Whose::Given => "the chat template given",
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Whose::Model => "give a chat template of your own, or render the prompt without one",
            Whose::Given => "fix the template",
        }
    }
}

/// Renders `messages` with `template` (Hugging Face conventions: `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, Python string methods).
/// A template past [`MAX_TEMPLATE_BYTES`], one that runs past [`MAX_TEMPLATE_STEPS`] or writes
/// far more than its input is refused.
///
/// ```
/// let tpl = "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}{% endfor %}";
/// let text = logitprobe::text::chat::render(tpl, &logitprobe::text::chat::messages(" hi ", None), "", "").unwrap();
/// assert_eq!(text, "<user>hi");
/// ```
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> anyhow::Result<String> {
    render_as(Whose::Given, template, messages, bos_token, eos_token)
}

fn render_as(
    whose: Whose,
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> anyhow::Result<String> {
    let (name, fix) = (whose.name(), whose.fix());
    if template.len() > MAX_TEMPLATE_BYTES {
        return Err(usage!(
            "{name} is {} bytes, more than the {} a chat template may hold (real ones are a few KB); {fix}",
            template.len(),
            logitprobe_backends::human_bytes(MAX_TEMPLATE_BYTES as u64)
        ));
    }
    let input: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum::<usize>()
        + bos_token.len()
        + eos_token.len();
    let limit = input.saturating_mul(16).saturating_add(MEMORY_SLACK);
    let over = || {
        usage!(
            "{name} takes more than {} of memory for {input} bytes of messages, a value that grows without end; {fix}",
            logitprobe_backends::human_bytes(limit as u64)
        )
    };
    let key = template_key(template);
    if OVER_BUDGET
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key)
    {
        return Err(over());
    }
    let owned = (
        template.to_string(),
        messages.to_vec(),
        bos_token.to_string(),
        eos_token.to_string(),
    );
    let rendered = budget::run(limit, move || {
        let (template, messages, bos_token, eos_token) = owned;
        render_here(whose, &template, &messages, &bos_token, &eos_token, input)
    });
    match rendered {
        Ok(text) => text,
        Err(RunError::OverBudget(_)) => {
            // Its thread stays parked with what it took: the same template is not run again.
            OVER_BUDGET
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(key);
            Err(over())
        }
        Err(e) => Err(usage!("{name} failed to render: {e}; {fix}")),
    }
}

/// The memory a rendering may hold beyond sixteen times its input: parsing a template of
/// [`MAX_TEMPLATE_BYTES`] takes some 40 MB, a real one rendered well under 1 MB.
const MEMORY_SLACK: usize = 256 << 20;

/// Templates whose rendering went over its memory budget in this process.
static OVER_BUDGET: std::sync::Mutex<Vec<[u8; 32]>> = std::sync::Mutex::new(Vec::new());

fn template_key(template: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(template.as_bytes()).into()
}

/// Parses and renders, on the budgeted thread.
fn render_here(
    whose: Whose,
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
    input: usize,
) -> anyhow::Result<String> {
    let (name, fix) = (whose.name(), whose.fix());
    let env = environment(template).map_err(|e| usage!("{name} does not parse: {e}; {fix}"))?;
    let tpl = env.get_template("chat").expect("just added");
    let mut out = Bounded {
        text: Vec::new(),
        max: input.saturating_mul(4).saturating_add(OUTPUT_SLACK),
        refused: false,
    };
    let rendered = tpl.render_captured_to(
        context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        },
        &mut out,
    );
    match rendered {
        Ok(_) => Ok(String::from_utf8(out.text)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(usage!(
            "{name} runs past {MAX_TEMPLATE_STEPS} steps, a loop without end; {fix}"
        )),
        Err(_) if out.refused => Err(usage!(
            "{name} writes more than {} bytes for {input} bytes of messages, text that grows without end; {fix}",
            out.max
        )),
        Err(e) => Err(usage!("{name} failed to render: {e}; {fix}")),
    }
}

/// The environment chat templates render in, holding `template` as "chat": Hugging Face's
/// conventions, and at most [`MAX_TEMPLATE_STEPS`] steps a rendering.
fn environment(template: &str) -> Result<Environment<'_>, Error> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.set_fuel(Some(MAX_TEMPLATE_STEPS));
    env.add_template("chat", template)?;
    Ok(env)
}

/// The rendered text, refused past `max` bytes: a write that would pass it fails, which ends
/// the rendering.
struct Bounded {
    text: Vec<u8>,
    max: usize,
    refused: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.max {
            self.refused = true;
            return Err(std::io::Error::other("the rendering's bound"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A chat template asked for, and the model has none (a base model).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model {model} has no chat template; give one, render the prompt without one, or use an instruct model")]
pub struct NoChatTemplate {
    pub model: String,
}

/// Renders one prompt with the source's own template.
pub fn render_for(
    source: &dyn Vocab,
    prompt: &str,
    system_prompt: Option<&str>,
) -> anyhow::Result<String> {
    if source.chat_template().is_none() {
        return Err(NoChatTemplate {
            model: source.info().name.clone(),
        }
        .into());
    }
    render_messages(source, &messages(prompt, system_prompt))
}

/// Renders a conversation with the source's own template.
pub fn render_messages(source: &dyn Vocab, messages: &[Message]) -> anyhow::Result<String> {
    let template = source.chat_template().ok_or_else(|| {
        usage!(
            "model {} has no chat template, so it cannot take chat messages: use an instruct model, or send a plain prompt",
            source.info().name
        )
    })?;
    render_source(Whose::Model, source, &template, messages)
}

/// Renders a conversation with `template` (Jinja source given in place of the model's), the
/// source's BOS and EOS text.
pub fn render_with(
    source: &dyn Vocab,
    template: &str,
    messages: &[Message],
) -> anyhow::Result<String> {
    render_source(Whose::Given, source, template, messages)
}

fn render_source(
    whose: Whose,
    source: &dyn Vocab,
    template: &str,
    messages: &[Message],
) -> anyhow::Result<String> {
    let info = source.info();
    let piece = |id: Option<u32>| {
        id.and_then(|i| source.token_bytes(i))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    render_as(
        whose,
        template,
        messages,
        &piece(info.bos),
        &piece(info.eos),
    )
}

/// Chat templates by the names llama.cpp's `--chat-template` takes, for models whose file
/// has none (a base model) or the wrong one.
pub const NAMED_TEMPLATES: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
    (
        "gemma",
        "{{ bos_token }}{% set sys = messages[0].content ~ '\\n\\n' if messages[0].role == 'system' else '' %}{% for m in messages if m.role != 'system' %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ (sys if loop.first else '') ~ (m.content | trim) }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
    (
        "llama3",
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    ),
    (
        "phi3",
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    ),
];

/// A `--chat-template` value: one of [`NAMED_TEMPLATES`], or Jinja source itself.
pub fn template_source(value: &str) -> String {
    NAMED_TEMPLATES
        .iter()
        .find(|(name, _)| *name == value)
        .map_or_else(|| value.to_string(), |(_, src)| (*src).to_string())
}

#[cfg(test)]
mod named_template_tests {
    use super::*;

    #[test]
    fn every_named_template_renders_a_conversation() {
        let msgs = messages("What is 2+2?", Some("Be brief."));
        for (name, src) in NAMED_TEMPLATES {
            let text = render(src, &msgs, "<bos>", "<eos>").unwrap();
            assert!(text.contains("What is 2+2?"), "{name}: {text}");
            assert!(
                text.contains("Be brief."),
                "{name} keeps the system message: {text}"
            );
        }
        let gemma = render(&template_source("gemma"), &msgs, "<bos>", "").unwrap();
        assert_eq!(
            gemma,
            "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}

#[cfg(test)]
mod hostile_template_tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The error rendering `template` ends with, within seconds.
    fn refused(whose: Whose, template: &str) -> String {
        let t0 = Instant::now();
        let e = render_as(whose, template, &messages("hi", None), "<s>", "</s>")
            .unwrap_err()
            .to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{e} after {:?}",
            t0.elapsed()
        );
        e
    }

    #[test]
    fn a_template_that_loops_without_end_runs_out_of_steps() {
        // 10^10 iterations: hours, before the steps were counted.
        let e = refused(
            Whose::Model,
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert_eq!(
            e,
            "the model's chat template runs past 20000000 steps, a loop without end; give a chat template of your own, or render the prompt without one"
        );
    }

    #[test]
    fn recursion_stops_at_minijinjas_limit() {
        let e = refused(
            Whose::Given,
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        );
        assert!(
            e.starts_with("the chat template given failed to render: ")
                && e.contains("recursion limit exceeded")
                && e.ends_with("; fix the template"),
            "{e}"
        );
        let deep = format!("{{{{ {}1{} }}}}", "(".repeat(100_000), ")".repeat(100_000));
        let e = refused(Whose::Model, &deep);
        assert!(
            e.contains("does not parse") && e.contains("recursion"),
            "{e}"
        );
    }

    #[test]
    fn a_template_past_the_size_bound_is_refused_unparsed() {
        // A 50 MB template took 22 s and 3 GB to parse.
        let big = "{{ messages[0].content }}".repeat((2 << 20) / 25 + 1);
        let e = refused(Whose::Model, &big);
        assert!(
            e.starts_with(&format!(
                "the model's chat template is {} bytes, more than the 1 MiB a chat template may hold",
                big.len()
            )),
            "{e}"
        );
    }

    #[test]
    fn values_that_grow_without_end_are_stopped_within_the_memory_bound() {
        // Each doubles what it holds, 40 or 60 times, without writing any of it: a terabyte
        // before the rendering's memory was bounded.
        for template in [
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% set ns = namespace(l=['x' * 1000]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|join|length }}",
            "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}{{ ns.s|length }}",
        ] {
            let e = refused(Whose::Model, template);
            assert!(
                e.starts_with("the model's chat template takes more than 257 MiB of memory for 13 bytes of messages")
                    && e.ends_with("a value that grows without end; give a chat template of your own, or render the prompt without one"),
                "{template}: {e}"
            );
            // Its second rendering is refused at once, and parks no second thread.
            let t0 = Instant::now();
            assert_eq!(refused(Whose::Model, template), e);
            assert!(t0.elapsed() < Duration::from_millis(100));
        }
    }

    #[test]
    fn a_template_just_under_the_size_bound_renders_within_the_memory_bound() {
        let n = MAX_TEMPLATE_BYTES / 25;
        let tpl = "{{ messages[0].content }}".repeat(n);
        let text = render_as(Whose::Model, &tpl, &messages("hi", None), "", "").unwrap();
        assert_eq!(text, "hi".repeat(n));
    }

    #[test]
    fn output_that_grows_without_end_is_cut_short() {
        // A terabyte of text, 10 MB a step, before the output was bounded.
        let e = refused(
            Whose::Model,
            "{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        );
        assert!(
            e.starts_with(
                "the model's chat template writes more than 16777268 bytes for 13 bytes of messages"
            ),
            "{e}"
        );
    }

    #[test]
    fn long_conversations_fit_the_bounds() {
        let mut msgs = messages("What is 2+2?", Some("Be brief."));
        for i in 0..20_000 {
            msgs.push(Message {
                role: if i % 2 == 0 { "assistant" } else { "user" }.into(),
                content: format!("turn {i} ").repeat(20),
            });
        }
        for (name, src) in NAMED_TEMPLATES {
            let text = render_as(Whose::Model, src, &msgs, "<bos>", "<eos>").unwrap();
            assert!(text.contains("turn 19999"), "{name}");
        }
    }
}
