//! Request bodies for `/chat/completions` and `/completions`, and the token estimate used by
//! the tokens-per-minute limiter.

use aligner_backend::{CompletionRequest, Prompt};
use serde_json::Value;

use crate::wire::{ChatMessage, RequestBody, RequestParams};

/// Which OpenAI endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST {base_url}/chat/completions` with `messages`.
    Chat,
    /// `POST {base_url}/completions` with a raw `prompt`.
    Completions,
}

impl Endpoint {
    pub fn for_prompt(prompt: &Prompt) -> Self {
        match prompt {
            Prompt::Chat(_) => Endpoint::Chat,
            Prompt::Raw(_) => Endpoint::Completions,
        }
    }

    /// The path below `base_url`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

/// The model a request addresses: its own override, else the configured one.
pub fn effective_model<'a>(request: &'a CompletionRequest, default_model: &'a str) -> &'a str {
    request.model.as_deref().unwrap_or(default_model)
}

/// The JSON body for `request`: model, messages or prompt, the sampling fields that are set
/// (including the non-standard `top_k` and `repetition_penalty` that vLLM, SGLang and
/// llama.cpp accept), `n = 1` and `stream = false`.
pub fn build_body(request: &CompletionRequest, default_model: &str) -> (Endpoint, Value) {
    let (messages, prompt) = match &request.prompt {
        Prompt::Chat(messages) => (
            Some(
                messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ),
            None,
        ),
        Prompt::Raw(prompt) => (None, Some(prompt.clone())),
    };
    let s = &request.sampling;
    let body = RequestBody {
        model: effective_model(request, default_model).to_string(),
        messages,
        prompt,
        params: RequestParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k.map(i64::from),
            max_tokens: s.max_tokens,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            stop: (!s.stop.is_empty()).then(|| Value::from(s.stop.clone())),
            n: Some(1),
            stream: Some(false),
            ..Default::default()
        },
    };
    let value = serde_json::to_value(body).expect("a request body serializes");
    (Endpoint::for_prompt(&request.prompt), value)
}

/// Completion tokens assumed when `max_tokens` is unset.
pub const DEFAULT_MAX_TOKENS_ESTIMATE: u32 = 256;

/// Tokens a request is assumed to cost before it runs: prompt characters / 4 plus
/// `max_tokens` (or [`DEFAULT_MAX_TOKENS_ESTIMATE`]).
pub fn estimate_tokens(request: &CompletionRequest) -> u64 {
    let chars: usize = match &request.prompt {
        Prompt::Chat(messages) => messages.iter().map(|m| m.content.chars().count()).sum(),
        Prompt::Raw(p) => p.chars().count(),
    };
    chars as u64 / 4
        + u64::from(
            request
                .sampling
                .max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS_ESTIMATE),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aligner_backend::{Message, Sampling};

    #[test]
    fn chat_body_has_only_set_fields() {
        let req = CompletionRequest {
            prompt: Prompt::Chat(vec![Message::new("user", "hi")]),
            sampling: Sampling {
                temperature: Some(0.5),
                ..Default::default()
            },
            model: None,
        };
        let (ep, body) = build_body(&req, "m");
        assert_eq!(ep, Endpoint::Chat);
        assert_eq!(
            body,
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.5, "n": 1, "stream": false})
        );
    }

    #[test]
    fn raw_body_with_all_fields_and_override() {
        let req = CompletionRequest {
            prompt: Prompt::Raw("p".into()),
            sampling: Sampling {
                temperature: Some(0.0),
                top_p: Some(0.9),
                top_k: Some(40),
                max_tokens: Some(64),
                frequency_penalty: Some(0.1),
                presence_penalty: Some(0.2),
                repetition_penalty: Some(1.1),
                seed: Some(7),
                stop: vec!["\n".into()],
            },
            model: Some("ckpt-1".into()),
        };
        let (ep, body) = build_body(&req, "m");
        assert_eq!(ep, Endpoint::Completions);
        assert_eq!(
            body,
            serde_json::json!({"model": "ckpt-1", "prompt": "p", "temperature": 0.0, "top_p": 0.9,
                "top_k": 40, "max_tokens": 64, "frequency_penalty": 0.1, "presence_penalty": 0.2,
                "repetition_penalty": 1.1, "seed": 7, "stop": ["\n"], "n": 1, "stream": false})
        );
    }

    #[test]
    fn token_estimate() {
        let mut req = CompletionRequest {
            prompt: Prompt::Raw("x".repeat(400)),
            sampling: Sampling::default(),
            model: None,
        };
        assert_eq!(estimate_tokens(&req), 100 + 256);
        req.sampling.max_tokens = Some(10);
        assert_eq!(estimate_tokens(&req), 110);
    }
}
