//! Chat templates: a model's own Jinja template rendered with minijinja the way transformers
//! renders it (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`,
//! `strftime_now`, a Python-style `tojson`).

use std::collections::BTreeMap;

use aligner_backend::Message;
use anyhow::{anyhow, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

const TEMPLATE_NAME: &str = "chat_template";
/// Marks the errors raised by the template itself, to report them by their message alone.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template`; a syntax error is reported with its line in the template.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(template))
            .map_err(|e| match e.line() {
                Some(line) => anyhow!(
                    "chat template syntax error at line {line}: {}{}",
                    e.kind(),
                    e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                ),
                None => anyhow!("chat template syntax error: {e}"),
            })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (each `{role, content}`); `add_generation_prompt` appends the
    /// header that starts the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut o = BTreeMap::new();
                o.insert("role", Value::from(m.role.as_str()));
                o.insert("content", Value::from(m.content.as_str()));
                Value::from(o)
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes these as None when unused.
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        // Special tokens the tokenizer lacks stay undefined (they render as ""), as in
        // transformers, which only passes the tokens that are set.
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {e}"))?;
        tmpl.render(Value::from(ctx)).map_err(render_error)
    }
}

fn render_error(e: Error) -> anyhow::Error {
    if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
        return anyhow!("the chat template raised an error: {msg}");
    }
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    match e.line() {
        Some(line) => anyhow!(
            "rendering the chat template failed at line {line}: {}{detail}",
            e.kind()
        ),
        None => anyhow!("rendering the chat template failed: {}{detail}", e.kind()),
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (they only tag the
/// assistant's tokens for training masks and render nothing).
fn strip_generation_tags(template: &str) -> String {
    let mut out = template.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), "");
        }
    }
    out
}

/// `tojson(value, indent=None)`, formatted like Python's `json.dumps(ensure_ascii=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // transformers also accepts these; their defaults are the only behaviour offered here.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson cannot serialize the value: {e}"),
        )
    })?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let hour12 = if h % 12 == 0 { 12 } else { h % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        match code {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'H' => out.push_str(&format!("{h:02}")),
            'I' => out.push_str(&format!("{hour12:02}")),
            'M' => out.push_str(&format!("{mi:02}")),
            'S' => out.push_str(&format!("{s:02}")),
            'p' => out.push_str(if h < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[(m - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'j' => out.push_str(&format!("{yday:03}")),
            'F' => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            'T' => out.push_str(&format!("{h:02}:{mi:02}:{s:02}")),
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{other}"),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn loop_controls_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(&[msg("user", "a"), msg("assistant", "b")], false)
            .unwrap();
        assert_eq!(out, "a");
    }

    #[test]
    fn chatml_without_system_message_gets_the_default_one() {
        let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).unwrap();
        let out = t.render(&[msg("user", "Hi there")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_with_system_message_and_no_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(
                &[
                    msg("system", "Be brief."),
                    msg("user", "Hi"),
                    msg("assistant", "Hello!"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_block_trimming() {
        let tmpl = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'system' %}\n        {{ raise_exception('no system') }}\n    {% endif %}\n    {% if m.content.startswith(' ') %}[lead]{% endif %}\n{{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}\n";
        let t = ChatTemplate::new(tmpl, Some("<s>".into()), None).unwrap();
        let out = t
            .render(&[msg("user", "  hello  "), msg("assistant", "yo")], false)
            .unwrap();
        assert_eq!(out, "<s>\n[lead]USER: hello\nASSISTANT: yo\n");
    }

    #[test]
    fn raise_exception_fails_with_its_message() {
        let tmpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok";
        let t = ChatTemplate::new(tmpl, None, None).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "ok");
        let err = t
            .render(&[msg("assistant", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = ChatTemplate::new("line one\n{% if %}\n", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn missing_bos_token_renders_empty() {
        let t = ChatTemplate::new("[{{ bos_token }}]", None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]");
    }

    #[test]
    fn tojson_is_python_style() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[msg("user", "é<\"x\">\n")], false).unwrap();
        assert_eq!(
            out,
            "{\"content\": \"é<\\\"x\\\">\\n\", \"role\": \"user\"}|[\n  {\n    \"content\": \"é<\\\"x\\\">\\n\",\n    \"role\": \"user\"\n  }\n]"
        );
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-23 13:05:09 UTC, a Tuesday, day 205 of a leap year.
        let s = strftime("%d %b %Y|%A %B %j|%H:%M:%S %p %I|%F %%", 1_721_739_909).unwrap();
        assert_eq!(
            s,
            "23 Jul 2024|Tuesday July 205|13:05:09 PM 01|2024-07-23 %"
        );
        assert!(strftime_now("%Y".into()).unwrap().len() == 4);
    }

    #[test]
    fn generation_tags_are_ignored() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[msg("assistant", "a")], false).unwrap(), "a");
    }
}
