//! Streamed answers (`"stream": true`): the server-sent events of an OpenAI-compatible server
//! read as they arrive, each text piece handed on at once.
//!
//! [`Events`] cuts the bytes into `data:` payloads (across chunk boundaries, `\n` or `\r\n`
//! line ends); [`Answer`] folds the payloads (`chat.completion.chunk` or streamed
//! `text_completion` objects) into the text, finish reason, model and usage of a
//! [`ParsedResponse`]. A stream that ends without a finish reason, or that carries an
//! `error` object, is an error: the server stopped in the middle of the answer.

use aligner_backend::FinishReason;
use serde_json::Value;

use crate::body::Endpoint;
use crate::response::{excerpt, ParsedResponse};

/// The `data:` payloads in a byte stream, in order.
#[derive(Default)]
pub(crate) struct Events {
    buf: Vec<u8>,
}

impl Events {
    /// Adds bytes; returns the payloads of the lines they completed.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.strip_prefix(' ').unwrap_or(data).to_string());
            }
        }
        out
    }
}

/// What a stream has said so far.
pub(crate) struct Answer {
    endpoint: Endpoint,
    text: String,
    finish: Option<FinishReason>,
    model: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    done: bool,
}

/// What one payload was.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// A piece of text (possibly empty: a role-only or usage-only chunk).
    Text(String),
    /// `[DONE]`.
    Done,
}

impl Answer {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Answer {
            endpoint,
            text: String::new(),
            finish: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            done: false,
        }
    }

    /// Characters received so far.
    pub(crate) fn received(&self) -> usize {
        self.text.chars().count()
    }

    /// Reads one payload; an `error` object or a payload that is not a chunk is an error.
    pub(crate) fn read(&mut self, payload: &str) -> Result<Step, String> {
        let payload = payload.trim();
        if payload == "[DONE]" {
            self.done = true;
            return Ok(Step::Done);
        }
        let v: Value = serde_json::from_str(payload).map_err(|_| {
            format!(
                "a streamed event is not JSON: {}",
                excerpt(payload.as_bytes())
            )
        })?;
        if let Some(e) = v.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Err(format!("the server sent an error in the stream: {message}"));
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.model = Some(m.to_string());
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let count = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as u32);
            self.prompt_tokens = count("prompt_tokens").or(self.prompt_tokens);
            self.completion_tokens = count("completion_tokens").or(self.completion_tokens);
        }
        let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(Step::Text(String::new()));
        };
        let piece = match self.endpoint {
            Endpoint::Chat => choice.get("delta").and_then(|d| d.get("content")),
            Endpoint::Completions => choice.get("text"),
        }
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(FinishReason::parse(f));
        }
        self.text.push_str(&piece);
        Ok(Step::Text(piece))
    }

    /// The whole answer, once the stream has ended (`requested_model` when the server named
    /// none). Without a finish reason the server stopped in the middle of the answer.
    pub(crate) fn finish(self, requested_model: &str) -> Result<ParsedResponse, String> {
        let Some(finish_reason) = self.finish else {
            return Err(format!(
                "the stream ended after {} characters without a finish_reason{}: the server stopped in the middle of the answer",
                self.text.chars().count(),
                if self.done { " (it sent [DONE])" } else { " or [DONE]" }
            ));
        };
        Ok(ParsedResponse {
            text: self.text,
            finish_reason,
            model: self.model.unwrap_or_else(|| requested_model.to_string()),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_across_chunks_and_line_ends() {
        let mut e = Events::default();
        assert!(e.push(b"data: {\"a\"").is_empty());
        assert_eq!(e.push(b":1}\r\n\r\ndata: [DO"), vec!["{\"a\":1}"]);
        assert_eq!(
            e.push(b"NE]\n\n: comment\nevent: x\ndata:x\n"),
            vec!["[DONE]", "x"]
        );
    }

    #[test]
    fn a_chat_stream_folds_into_the_answer() {
        let mut a = Answer::new(Endpoint::Chat);
        let steps = [
            r#"{"model":"srv","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo."},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
            "[DONE]",
        ]
        .map(|p| a.read(p).unwrap());
        assert_eq!(steps[1], Step::Text("Hel".into()));
        assert_eq!(steps[4], Step::Done);
        let p = a.finish("req").unwrap();
        assert_eq!(p.text, "Hello.");
        assert_eq!(p.finish_reason, FinishReason::Stop);
        assert_eq!(p.model, "srv");
        assert_eq!((p.prompt_tokens, p.completion_tokens), (Some(5), Some(2)));
    }

    #[test]
    fn a_stream_cut_short_or_carrying_an_error_is_an_error() {
        let mut a = Answer::new(Endpoint::Completions);
        a.read(r#"{"choices":[{"text":"Half an ans","finish_reason":null}]}"#)
            .unwrap();
        assert_eq!(a.received(), 11);
        let e = a.finish("req").unwrap_err();
        assert!(
            e.contains("after 11 characters without a finish_reason"),
            "{e}"
        );
        let mut a = Answer::new(Endpoint::Chat);
        let e = a
            .read(r#"{"error":{"message":"CUDA out of memory","type":"server_error"}}"#)
            .unwrap_err();
        assert!(e.contains("CUDA out of memory"), "{e}");
        assert!(a.read("not json").is_err());
    }
}
