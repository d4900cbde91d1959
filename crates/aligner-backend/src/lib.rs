//! Backend traits and the request/response types every model backend speaks.
//!
//! The engine talks to models only through [`TextGenerator`]; the OpenAI-compatible HTTP
//! backend (`aligner-openai`) and the local candle backend implement it. Keeping this crate
//! free of heavy dependencies lets every backend build on its own.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What the model is asked: chat messages rendered by the model's own chat template, or a
/// raw prompt sent as-is (the `aligner-v1` family of correction templates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    Chat(Vec<Message>),
    Raw(String),
}

/// Sampling parameters. `None` means "the server's default"; backends send only what is set.
/// Also the pipeline YAML's `sampling:` mapping (`aligner-spec` validates the ranges).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of sampling settings")]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub max_tokens: Option<u32>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// One completion request. `model` overrides the backend's configured model name for this
/// request (how a later round addresses the checkpoint a server now serves).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub model: Option<String>,
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// The `max_tokens` limit: the text is truncated.
    Length,
    Other(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "stop" | "eos" | "end_turn" | "stop_sequence" => FinishReason::Stop,
            "length" | "max_tokens" => FinishReason::Length,
            other => FinishReason::Other(other.to_string()),
        }
    }
}

/// A finished completion with what the store keeps as provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    /// The model name the server reported (or the local model's id).
    pub model: String,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    /// Wall time of the successful attempt.
    pub latency: Duration,
    /// Attempts it took, 1 when the first one succeeded.
    pub attempts: u32,
    /// Which endpoint answered, when a model has several (replicas); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// A request that failed for good (after the backend's own retries).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (after {attempts} attempt(s))")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Worth retrying later (429, 5xx, timeout, connection refused) but retries ran out.
    Transient,
    /// Retrying will not help (4xx other than 429, malformed response, bad config).
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// Anything that turns a prompt into text: an HTTP server, a local model.
#[async_trait::async_trait]
pub trait TextGenerator: Send + Sync {
    /// A stable id for provenance (e.g. `openai:http://host/v1#model`).
    fn id(&self) -> String;
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, Error>;

    /// Like [`complete`](Self::complete), sending text pieces to `sink` as they are produced
    /// (concatenated, they equal the final text). Backends that cannot stream send the whole
    /// text once at the end. A closed `sink` (the client went away) is not an error.
    async fn complete_streaming(
        &self,
        request: CompletionRequest,
        sink: TextSink,
    ) -> Result<Completion, Error> {
        let completion = self.complete(request).await?;
        if !completion.text.is_empty() {
            let _ = sink.send(completion.text.clone());
        }
        Ok(completion)
    }
}

/// Where streamed text pieces go.
pub type TextSink = tokio::sync::mpsc::UnboundedSender<String>;

/// Cosine similarity in [-1, 1]; 0 when either vector is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0) as f32
}

/// Turns texts into vectors whose cosine similarity says how alike their meanings are (the
/// synthesize stage's semantic filter). Synchronous and CPU-bound: callers run it on a
/// blocking thread.
pub trait Embedder: Send + Sync {
    /// One vector per text, in order, all of the same length.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Error>;
}
