//! Parsing completion responses defensively: anything unexpected is an error with a short
//! excerpt of the body, never a panic.

use aligner_backend::FinishReason;
use serde_json::Value;

use crate::body::Endpoint;

/// Longest body excerpt put into an error message, in characters.
pub const EXCERPT_CHARS: usize = 200;

/// What a successful response carried.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedResponse {
    pub text: String,
    pub finish_reason: FinishReason,
    pub model: String,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

/// At most [`EXCERPT_CHARS`] characters of `body` on one line (lossy UTF-8, control
/// characters as spaces, `…` when cut).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(EXCERPT_CHARS.min(text.len()) + 3);
    for (n, c) in text.chars().enumerate() {
        if n == EXCERPT_CHARS - 1 && text.chars().nth(EXCERPT_CHARS).is_some() {
            out.push('…');
            break;
        }
        if n >= EXCERPT_CHARS {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

fn token_count(v: &Value) -> Option<u32> {
    v.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Parses a 200 body from `endpoint`. `requested_model` is used when the body names none.
pub fn parse_response(
    body: &[u8],
    endpoint: Endpoint,
    requested_model: &str,
) -> Result<ParsedResponse, String> {
    let bad = |what: &str| format!("{what}: {}", excerpt(body));
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("response is not valid JSON"))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| bad("response has no choices"))?;
    let text = match endpoint {
        Endpoint::Chat => {
            let message = choice
                .get("message")
                .ok_or_else(|| bad("choices[0] has no message"))?;
            match message.get("content") {
                Some(Value::String(s)) => s.clone(),
                // Content is null when the model produced nothing visible (e.g. only
                // reasoning before hitting max_tokens); the finish reason says why.
                Some(Value::Null) => String::new(),
                _ => return Err(bad("choices[0].message.content is not a string")),
            }
        }
        Endpoint::Completions => match choice.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad("choices[0].text is not a string")),
        },
    };
    let finish_reason = match choice.get("finish_reason").and_then(Value::as_str) {
        Some(s) => FinishReason::parse(s),
        None => FinishReason::Other("unknown".to_string()),
    };
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(requested_model)
        .to_string();
    let usage = v.get("usage");
    let prompt_tokens = usage
        .and_then(|u| u.get("prompt_tokens"))
        .and_then(token_count);
    let completion_tokens = usage
        .and_then(|u| u.get("completion_tokens"))
        .and_then(token_count);
    Ok(ParsedResponse {
        text,
        finish_reason,
        model,
        prompt_tokens,
        completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_completions() {
        let chat = br#"{"model":"srv","choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let p = parse_response(chat, Endpoint::Chat, "req").unwrap();
        assert_eq!(p.text, "hi");
        assert_eq!(p.finish_reason, FinishReason::Length);
        assert_eq!(p.model, "srv");
        assert_eq!((p.prompt_tokens, p.completion_tokens), (Some(3), Some(1)));

        let raw = br#"{"choices":[{"text":"t","finish_reason":null}]}"#;
        let p = parse_response(raw, Endpoint::Completions, "req").unwrap();
        assert_eq!(p.text, "t");
        assert_eq!(p.finish_reason, FinishReason::Other("unknown".into()));
        assert_eq!(p.model, "req");
        assert_eq!((p.prompt_tokens, p.completion_tokens), (None, None));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: &[(&[u8], Endpoint, &str)] = &[
            (b"", Endpoint::Chat, "not valid JSON"),
            (
                b"<html>bad gateway</html>",
                Endpoint::Chat,
                "not valid JSON",
            ),
            (
                br#"{"choices":[{"text":"tru"#,
                Endpoint::Completions,
                "not valid JSON",
            ),
            (br#"{"object":"x"}"#, Endpoint::Chat, "no choices"),
            (br#"{"choices":[]}"#, Endpoint::Chat, "no choices"),
            (br#"{"choices":{}}"#, Endpoint::Chat, "no choices"),
            (br#"[1,2]"#, Endpoint::Chat, "no choices"),
            (
                br#"{"choices":[{"text":"x"}]}"#,
                Endpoint::Chat,
                "no message",
            ),
            (
                br#"{"choices":[{"message":{"content":5}}]}"#,
                Endpoint::Chat,
                "not a string",
            ),
            (
                br#"{"choices":[{"message":{"content":"x"}}]}"#,
                Endpoint::Completions,
                "not a string",
            ),
        ];
        for (body, ep, want) in cases {
            let err = parse_response(body, *ep, "m").unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn odd_but_valid_fields_are_tolerated() {
        let body = br#"{"model":7,"choices":[{"message":{"content":null},"finish_reason":3}],"usage":{"prompt_tokens":"x","completion_tokens":99999999999}}"#;
        let p = parse_response(body, Endpoint::Chat, "m").unwrap();
        assert_eq!(p.text, "");
        assert_eq!(p.model, "m");
        assert_eq!(p.finish_reason, FinishReason::Other("unknown".into()));
        assert_eq!(
            (p.prompt_tokens, p.completion_tokens),
            (None, Some(u32::MAX))
        );
    }

    #[test]
    fn excerpt_is_short_and_single_line() {
        assert_eq!(excerpt(b"a\nb"), "a b");
        let long = "é".repeat(500);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS);
        assert!(e.ends_with('…'));
        let exact = "x".repeat(EXCERPT_CHARS);
        assert_eq!(excerpt(exact.as_bytes()), exact);
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }
}
