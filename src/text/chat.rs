//! Chat templates: the model's own Jinja template, rendered by one renderer (minijinja) for
//! every engine, so the same messages give the same prompt text and ids whatever the engine.

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

/// Renders `messages` with `template` (Hugging Face conventions: `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, Python string methods).
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
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .map_err(|e| usage!("the model's chat template does not parse: {e}"))?;
    let tpl = env.get_template("chat").expect("just added");
    tpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| usage!("the model's chat template failed to render: {e}"))
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
    render_with(source, &template, messages)
}

/// Renders a conversation with `template` (Jinja source), the source's BOS and EOS text.
pub fn render_with(
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
    render(template, messages, &piece(info.bos), &piece(info.eos))
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
