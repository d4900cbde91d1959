//! The OpenAI API's request and response shapes, defined once: this crate's client sends
//! [`RequestBody`], and `aligner-server` reads [`RequestParams`] and answers with
//! [`Completion`], [`Chunk`], [`ModelList`] and [`ErrorBody`].
//!
//! Requests are read leniently (unknown fields are accepted, since clients send many) and
//! written with only the fields that are set. Responses keep OpenAI's fields, including the
//! ones that are always `null` here (`logprobs`, `system_fingerprint`), because some clients
//! look for them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One chat message as requests and answers carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The request fields `/chat/completions` and `/completions` share: sampling, `n`,
/// streaming, and the fields a server may have to refuse. `top_k` and
/// `repetition_penalty` are the vLLM-style extensions that vLLM, SGLang and llama.cpp accept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// `-1` or `0` means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Multiplicative; 1 means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// A string or a list of strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

/// A request body as the client sends it: `messages` for `/chat/completions`, `prompt` for
/// `/completions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestBody {
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(flatten)]
    pub params: RequestParams,
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole answer (`chat.completion` or `text_completion`); `extra` holds a server's own
/// top-level fields (the correction proxy's `aligner`, and its usage is [`Usage`] with a
/// breakdown, hence the parameter `U`).
#[derive(Debug, Clone, Serialize)]
pub struct Completion<C, U = Usage> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    pub usage: U,
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A choice of a chat answer. `message.extra` holds a server's own fields
/// (`aligner_original`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

/// The assistant's message in a chat answer, or its piece (`delta`) in a chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AssistantMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AssistantMessage {
    /// `{"role": "assistant", "content": content}`.
    pub fn assistant(content: impl Into<String>) -> Self {
        AssistantMessage {
            role: Some("assistant"),
            content: Some(content.into()),
            extra: Map::new(),
        }
    }

    /// A chunk's `delta` carrying a text piece.
    pub fn piece(content: impl Into<String>) -> Self {
        AssistantMessage {
            content: Some(content.into()),
            ..Default::default()
        }
    }
}

/// A choice of a text completion (whole, or a chunk's piece).
#[derive(Debug, Clone, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

/// A streamed chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: AssistantMessage,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One server-sent event of a streamed answer (`chat.completion.chunk`, or
/// `text_completion`). `usage` is present only when the client asked for it
/// (`stream_options.include_usage`): `null` on every chunk but the last.
#[derive(Debug, Clone, Serialize)]
pub struct Chunk<C, U = Usage> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    pub system_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<U>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Any of the choices above, serialized as the one it holds.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Choice {
    Chat(ChatChoice),
    Text(TextChoice),
    Delta(ChunkChoice),
}

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

impl ModelObject {
    /// A model this project serves.
    pub fn served(id: &str, created: u64) -> Self {
        ModelObject {
            id: id.to_string(),
            object: "model".into(),
            created,
            owned_by: "aligner".into(),
        }
    }
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

impl ModelList {
    pub fn new(data: Vec<ModelObject>) -> Self {
        ModelList {
            object: "list".into(),
            data,
        }
    }
}

/// An error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unset_request_fields_are_left_out() {
        let body = RequestBody {
            model: "m".into(),
            messages: None,
            prompt: Some("p".into()),
            params: RequestParams {
                temperature: Some(0.0),
                ..Default::default()
            },
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"model": "m", "prompt": "p", "temperature": 0.0})
        );
    }

    #[test]
    fn chunk_usage_is_absent_null_or_counted() {
        let chunk = |usage| Chunk::<TextChoice, Usage> {
            id: "c".into(),
            object: "text_completion",
            created: 1,
            model: "m".into(),
            choices: vec![],
            system_fingerprint: None,
            usage,
            extra: Map::new(),
        };
        let v = serde_json::to_value(chunk(None)).unwrap();
        assert!(v.get("usage").is_none());
        assert_eq!(
            serde_json::to_value(chunk(Some(None))).unwrap()["usage"],
            Value::Null
        );
        let v = serde_json::to_value(chunk(Some(Some(Usage::new(2, 3))))).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert_eq!(v["system_fingerprint"], Value::Null);
    }
}
