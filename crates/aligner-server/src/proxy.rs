//! The correction proxy, `aligner serve --upstream URL --aligner MODEL`: forwards each chat
//! completion to an OpenAI-compatible upstream, has the Aligner correct the answer (the
//! question and the answer rendered by the correction template), and returns the correction
//! in OpenAI's shape with the original beside it (`choices[i].message.aligner_original` and a
//! top-level `aligner` object).
//!
//! The upstream call is never streamed (the Aligner needs the whole answer); with
//! `stream: true` the correction is streamed as it is generated. Statuses: a bad body is a 400
//! naming the field, a body over `--max-body-bytes` a 413, a failed upstream a 502 naming the
//! upstream, a failed Aligner a 502 naming the Aligner (or, with `--on-aligner-error
//! passthrough`, the original answer flagged). `Server-Timing` gives the time spent awaiting
//! each model, so a client can tell the proxy's own overhead from the models'. With `--record`
//! every choice lands in the store's `proxy_records` table. API keys come from environment
//! variables and appear in no response, log line or record.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aligner_backend::{Completion, CompletionRequest, Message, Prompt, Sampling, TextGenerator};
use aligner_openai::wire::{
    self, AssistantMessage, ChatChoice, ChunkChoice, ModelList, ModelObject, Usage,
};
use aligner_spec::{Invalid, LocalModel, LocalSource, Template};
use aligner_store::{NewProxyRecord, Store};
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{ApiError, Endpoint, ServeOptions};
use crate::sse::{self, Progress};

mod sentence;

/// Default `--max-body-bytes`.
const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// Default requests in flight to each model.
const DEFAULT_CONCURRENCY: u32 = 1024;
/// Records written per store transaction at most.
const RECORD_BATCH: usize = 256;

static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Where `--aligner-url` gets the rendered template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlignerEndpoint {
    /// `POST /completions` with the template as `prompt`.
    Completions,
    /// `POST /chat/completions` with the template as the one user message.
    Chat,
}

/// How the proxy corrects (`--stream-correction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamCorrection {
    /// Stream the upstream and correct it sentence by sentence as it arrives
    /// (`stream-aligner-v1`).
    Sentence,
}

/// What to answer when the Aligner fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnAlignerError {
    /// A 502 naming the Aligner.
    Fail,
    /// The upstream's answer as it is, flagged `aligner_passthrough`.
    Passthrough,
}

/// The correction proxy's options (`upstream` turns it on); each is the CLI flag of the same
/// name, which the errors name.
#[derive(Debug, Default, clap::Args)]
#[command(next_help_heading = "Correction proxy (with --upstream)")]
pub struct ProxyOptions {
    /// Run the correction proxy: forward chat completions to this OpenAI-compatible base URL
    /// (e.g. `http://host:8000/v1`) and answer with the Aligner's corrections.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// The model name sent upstream (default: the client's `model`).
    #[arg(long, value_name = "NAME")]
    pub upstream_model: Option<String>,
    /// The environment variable holding the upstream's API key (sent as a bearer token, never
    /// logged or stored).
    #[arg(long, value_name = "VAR")]
    pub upstream_api_key_env: Option<String>,
    /// Seconds to wait for an upstream answer, per attempt [default: 120].
    #[arg(long, value_name = "SECS")]
    pub upstream_timeout: Option<f64>,
    /// Retries of a failed upstream call (429, 5xx, timeouts) before answering 502 [default: 2].
    #[arg(long, value_name = "N")]
    pub upstream_retries: Option<u32>,
    /// The Aligner, run in-process: a `.gguf` file, a Hugging Face folder or a hub id.
    #[arg(long, value_name = "MODEL")]
    pub aligner: Option<String>,
    /// The Aligner behind an OpenAI-compatible server (its base URL); called on `/completions`.
    #[arg(long, value_name = "URL")]
    pub aligner_url: Option<String>,
    /// The Aligner's model name at `--aligner-url`.
    #[arg(long, value_name = "NAME")]
    pub aligner_model: Option<String>,
    /// The environment variable holding the key of `--aligner-url`.
    #[arg(long, value_name = "VAR")]
    pub aligner_api_key_env: Option<String>,
    /// How `--aligner-url` gets the rendered template (default `completions`).
    #[arg(long, value_name = "API", value_enum)]
    pub aligner_endpoint: Option<AlignerEndpoint>,
    /// Seconds to wait for a correction from `--aligner-url`, per attempt [default: 120].
    #[arg(long, value_name = "SECS")]
    pub aligner_timeout: Option<f64>,
    /// Retries of a failed call to `--aligner-url` [default: 2].
    #[arg(long, value_name = "N")]
    pub aligner_retries: Option<u32>,
    /// The correction template: `aligner-v1`, `aligner-general`, `aligner-empathy` or
    /// `aligner-v1-multiturn` (the last answer in the context of the conversation before it)
    /// [default: the one an Aligner checkpoint records, else `aligner-v1`].
    #[arg(long, value_name = "ID")]
    pub template: Option<String>,
    /// Most tokens in a correction [default: 512].
    #[arg(long, value_name = "N")]
    pub aligner_max_tokens: Option<u32>,
    /// The Aligner's sampling temperature, 0 for greedy [default: 0].
    #[arg(long, value_name = "T")]
    pub aligner_temperature: Option<f64>,
    /// When the Aligner fails: `fail` answers 502, `passthrough` returns the upstream's
    /// answer flagged `aligner_passthrough` [default: fail].
    #[arg(long, value_name = "WHAT", value_enum)]
    pub on_aligner_error: Option<OnAlignerError>,
    /// Record every question, answer and correction in this SQLite store (`proxy_records`).
    #[arg(long, value_name = "STORE")]
    pub record: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger ones get 413 [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Requests in flight to each model at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<u32>,
    /// The Aligner's price, `INPUT,OUTPUT` in USD per million tokens: each response's
    /// `usage.aligner.aligner.cost_usd` and `proxy_records.aligner_cost_usd` then say what the
    /// correction cost.
    #[arg(long, value_name = "INPUT,OUTPUT")]
    pub aligner_price: Option<String>,
    /// `sentence`: stream the upstream's answer and correct each sentence as soon as it is
    /// complete, with an Aligner trained for it (`stream-aligner-v1`) [default: correct the
    /// whole answer once it is in].
    #[arg(long, value_name = "HOW", value_enum)]
    pub stream_correction: Option<StreamCorrection>,
}

impl ProxyOptions {
    /// The first proxy option given, for "needs `--upstream`" errors.
    pub fn first_set(&self) -> Option<&'static str> {
        let set = [
            ("upstream-model", self.upstream_model.is_some()),
            ("upstream-api-key-env", self.upstream_api_key_env.is_some()),
            ("upstream-timeout", self.upstream_timeout.is_some()),
            ("upstream-retries", self.upstream_retries.is_some()),
            ("aligner", self.aligner.is_some()),
            ("aligner-url", self.aligner_url.is_some()),
            ("aligner-model", self.aligner_model.is_some()),
            ("aligner-api-key-env", self.aligner_api_key_env.is_some()),
            ("aligner-endpoint", self.aligner_endpoint.is_some()),
            ("aligner-timeout", self.aligner_timeout.is_some()),
            ("aligner-retries", self.aligner_retries.is_some()),
            ("template", self.template.is_some()),
            ("aligner-max-tokens", self.aligner_max_tokens.is_some()),
            ("aligner-temperature", self.aligner_temperature.is_some()),
            ("on-aligner-error", self.on_aligner_error.is_some()),
            ("aligner-price", self.aligner_price.is_some()),
            ("stream-correction", self.stream_correction.is_some()),
            ("record", self.record.is_some()),
            ("max-body-bytes", self.max_body_bytes.is_some()),
            ("max-concurrency", self.max_concurrency.is_some()),
        ];
        set.into_iter().find(|(_, on)| *on).map(|(name, _)| name)
    }
}

fn invalid(message: String) -> anyhow::Error {
    Invalid::Message(message).into()
}

/// A base URL the backends can use. Refuses credentials in it (they would end up in logs and
/// records) without echoing them.
fn check_url(flag: &str, key_flag: &str, url: &str) -> Result<String> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    if after_scheme.split('/').next().unwrap_or("").contains('@') {
        return Err(invalid(format!(
            "`--{flag}` must not carry credentials\nhint: put the key in an environment variable and pass `--{key_flag} VAR`"
        )));
    }
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || after_scheme.split('/').next().unwrap_or("").is_empty()
    {
        return Err(invalid(format!(
            "`--{flag}` must be a base URL like `http://127.0.0.1:8000/v1`, got `{url}`"
        )));
    }
    if url.contains(['?', '#']) {
        return Err(invalid(format!(
            "`--{flag}` must be a base URL without a query, like `http://127.0.0.1:8000/v1`"
        )));
    }
    Ok(url.trim().trim_end_matches('/').to_string())
}

fn api_key(flag: &str, var: Option<&str>) -> Result<Option<String>> {
    let Some(var) = var else { return Ok(None) };
    match std::env::var(var) {
        Ok(key) if !key.is_empty() => Ok(Some(key)),
        _ => Err(invalid(format!(
            "environment variable `{var}` (from `--{flag}`) is not set\nhint: export {var}=<your key>"
        ))),
    }
}

fn seconds(flag: &str, v: Option<f64>) -> Result<Duration> {
    let secs = v.unwrap_or(120.0);
    if !(secs.is_finite() && secs > 0.0) {
        return Err(invalid(format!(
            "`--{flag}` must be a positive number of seconds, got {secs}"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// An OpenAI-compatible backend with the proxy's limits, for `--{flag}`.
fn http_backend(flag: &str, mut config: aligner_openai::Config) -> Result<Arc<dyn TextGenerator>> {
    if let Some(ms) = std::env::var("ALIGNER_BACKOFF_BASE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        config.backoff_base = Duration::from_millis(ms);
    }
    let backend = aligner_openai::OpenAiBackend::new(config)
        .map_err(|e| invalid(format!("`--{flag}`: {}", e.message)))?;
    Ok(Arc::new(backend))
}

/// The base of a proxy backend's config: its URL, model, key and limits.
fn http_config(
    url: &str,
    model: &str,
    key: Option<String>,
    (timeout, retries, concurrency): (Duration, u32, u32),
) -> aligner_openai::Config {
    let mut config = aligner_openai::Config::new(url, model);
    config.api_key = key;
    config.timeout = timeout;
    config.max_retries = retries;
    config.max_concurrency = concurrency;
    config
}

/// The template an Aligner checkpoint folder records in its `aligner.json`: id, text, file.
fn recorded_template(model: &LocalModel) -> Option<(String, String, PathBuf)> {
    let LocalSource::HfFolder { path, .. } = &model.source else {
        return None;
    };
    let file = path.join("aligner.json");
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
    let text = meta["extra"]["template_text"].as_str()?.to_string();
    let id = meta["aligner_template"]
        .as_str()
        .unwrap_or("custom")
        .to_string();
    Some((id, text, file))
}

/// `--template`, checked against what a local Aligner checkpoint was trained with.
fn resolve_template(flag: Option<&str>, local: Option<&LocalModel>) -> Result<Template> {
    let chosen = match flag {
        Some(id) => Some(Template::builtin(id).ok_or_else(|| {
            invalid(format!(
                "unknown template `{id}`\nhint: `--template` is one of {}",
                Template::BUILTIN_IDS.map(|t| format!("`{t}`")).join(", ")
            ))
        })?),
        None => None,
    };
    match (chosen, local.and_then(recorded_template)) {
        (Some(t), Some((trained, text, file))) if t.text() != text => Err(invalid(format!(
            "the Aligner was trained with the template `{trained}` (recorded in `{}`), but `--template` is `{}`\nhint: leave out `--template`, so the Aligner reads the prompts it was trained on",
            file.display(),
            t.id()
        ))),
        (Some(t), _) => Ok(t),
        (None, Some((trained, text, _))) => Ok(Template::builtin(&trained)
            .filter(|t| t.text() == text)
            .unwrap_or(Template::Custom(text))),
        (None, None) => Ok(Template::AlignerV1),
    }
}

/// `aligner serve --upstream URL ...`: checks the options, loads or connects the Aligner,
/// listens, and serves until Ctrl-C or SIGTERM; then writes the last records.
pub async fn run(
    args: ServeOptions,
    keys: super::ApiKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(&str),
) -> Result<()> {
    let p = args.proxy;
    if let Some(model) = &args.model {
        return Err(invalid(format!(
            "MODEL `{model}` is not used with `--upstream`\nhint: in the correction proxy the Aligner is `--aligner {model}` (or `--aligner-url URL --aligner-model NAME`)"
        )));
    }
    let upstream_url = check_url(
        "upstream",
        "upstream-api-key-env",
        p.upstream.as_deref().unwrap_or_default(),
    )?;
    let concurrency = p.max_concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if concurrency == 0 {
        return Err(invalid("`--max-concurrency` must be at least 1".into()));
    }
    let max_body = p.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
    if max_body == 0 {
        return Err(invalid("`--max-body-bytes` must be at least 1".into()));
    }
    let aligner_price = match &p.aligner_price {
        None => None,
        Some(text) => {
            let parsed: Option<Vec<f64>> = text.split(',').map(|v| v.trim().parse().ok()).collect();
            match parsed.as_deref() {
                Some(&[input, output]) if input >= 0.0 && output >= 0.0 => Some((input, output)),
                _ => {
                    return Err(invalid(format!(
                        "`--aligner-price` must be INPUT,OUTPUT in USD per million tokens, got `{text}`\nhint: e.g. `--aligner-price 0.15,0.60`"
                    )))
                }
            }
        }
    };
    if let (Some(StreamCorrection::Sentence), Some(t)) = (p.stream_correction, &p.template) {
        return Err(invalid(format!(
            "`--template {t}` does not apply with `--stream-correction sentence`, which asks the Aligner one sentence at a time with `stream-aligner-v1`\nhint: drop `--template`, and use an Aligner trained with `aligner train-aligner --template stream-aligner-v1`"
        )));
    }
    let max_tokens = p.aligner_max_tokens.unwrap_or(512);
    if max_tokens == 0 {
        return Err(invalid("`--aligner-max-tokens` must be at least 1".into()));
    }
    let temperature = p.aligner_temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(format!(
            "`--aligner-temperature` must be between 0 and 2, got {temperature}"
        )));
    }
    if let Some(m) = p.upstream_model.as_deref().filter(|m| m.trim().is_empty()) {
        return Err(invalid(format!("`--upstream-model` is empty: `{m}`")));
    }
    let upstream = http_backend(
        "upstream",
        http_config(
            &upstream_url,
            p.upstream_model.as_deref().unwrap_or("default"),
            api_key("upstream-api-key-env", p.upstream_api_key_env.as_deref())?,
            (
                seconds("upstream-timeout", p.upstream_timeout)?,
                p.upstream_retries.unwrap_or(2),
                concurrency,
            ),
        ),
    )?;

    let (aligner, aligner_name, template) = match (&p.aligner, &p.aligner_url) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "`--aligner` and `--aligner-url` are exclusive\nhint: `--aligner MODEL` runs the Aligner in-process, `--aligner-url URL --aligner-model NAME` calls one served elsewhere".into(),
            ))
        }
        (None, None) => {
            return Err(invalid(
                "`--upstream` needs an Aligner\nhint: add `--aligner MODEL` (a `.gguf` file, a Hugging Face folder or a hub id) or `--aligner-url URL --aligner-model NAME`".into(),
            ))
        }
        (Some(model), None) => {
            for (flag, set) in [
                ("aligner-model", p.aligner_model.is_some()),
                ("aligner-api-key-env", p.aligner_api_key_env.is_some()),
                ("aligner-endpoint", p.aligner_endpoint.is_some()),
                ("aligner-timeout", p.aligner_timeout.is_some()),
                ("aligner-retries", p.aligner_retries.is_some()),
            ] {
                if set {
                    return Err(invalid(format!(
                        "`--{flag}` goes with `--aligner-url`, not with the in-process `--aligner {model}`"
                    )));
                }
            }
            let (spec, name) = super::model_spec(model)?;
            let sentence = p.stream_correction == Some(StreamCorrection::Sentence);
            let stream_id = aligner_spec::StreamTemplate.id();
            match recorded_template(&spec) {
                Some((id, _, file)) if id == stream_id && !sentence => {
                    return Err(invalid(format!(
                        "the Aligner `{model}` was trained for sentence-by-sentence correction (`{stream_id}`, recorded in `{}`)\nhint: add `--stream-correction sentence`",
                        file.display()
                    )))
                }
                Some((id, _, file)) if id != stream_id && sentence => {
                    return Err(invalid(format!(
                        "`--stream-correction sentence` needs an Aligner trained for it, but `{model}` was trained with `{id}` (recorded in `{}`)\nhint: train one with `aligner train-aligner --template {stream_id}`",
                        file.display()
                    )))
                }
                _ => {}
            }
            let template = match sentence {
                true => Template::AlignerV1,
                false => resolve_template(p.template.as_deref(), Some(&spec))?,
            };
            let max_batch = args.max_batch;
            let generator = tokio::task::spawn_blocking(move || super::load(&spec, max_batch))
                .await
                .context("loading the Aligner")??;
            (generator, name, template)
        }
        (None, Some(url)) => {
            let url = check_url("aligner-url", "aligner-api-key-env", url)?;
            let Some(model) = p.aligner_model.as_deref().filter(|m| !m.trim().is_empty()) else {
                return Err(invalid(
                    "`--aligner-url` needs `--aligner-model NAME`, the Aligner's name on that server".into(),
                ));
            };
            let template = resolve_template(p.template.as_deref(), None)?;
            let mut config = http_config(
                &url,
                model,
                api_key("aligner-api-key-env", p.aligner_api_key_env.as_deref())?,
                (
                    seconds("aligner-timeout", p.aligner_timeout)?,
                    p.aligner_retries.unwrap_or(2),
                    concurrency,
                ),
            );
            config.raw_as_chat = p.aligner_endpoint == Some(AlignerEndpoint::Chat);
            let generator = http_backend("aligner-url", config)?;
            (generator, model.to_string(), template)
        }
    };

    let (recorder, writer) = match &p.record {
        Some(path) => {
            let store = Store::open(path)
                .await
                .with_context(|| format!("opening the record store `{}`", path.display()))?;
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(tokio::spawn(write_records(store, rx))))
        }
        None => (None, None),
    };
    let name = args
        .name
        .or_else(|| p.upstream_model.clone())
        .unwrap_or_else(|| "aligner-proxy".into());
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on `{}:{}`", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(Proxy {
        upstream,
        upstream_url: upstream_url.clone(),
        upstream_model: p.upstream_model,
        aligner,
        template_hash: hex::encode(Sha256::digest(template.text().as_bytes())),
        template,
        sampling: Sampling {
            temperature: Some(temperature),
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        on_error: p.on_aligner_error.unwrap_or(OnAlignerError::Fail),
        recorder,
        name: name.clone(),
        created: super::unix_now(),
        max_body,
        aligner_price,
        aligner_name,
        sentence: p.stream_correction == Some(StreamCorrection::Sentence),
    });
    listening(&format!(
        "correcting {upstream_url} with the Aligner {} ({}) as {name} on http://{addr}/v1",
        state.aligner_name,
        if state.sentence {
            "stream-aligner-v1, sentence by sentence"
        } else {
            state.template.id()
        }
    ));
    let app = router(state, max_body, keys);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    if let Some(writer) = writer {
        // The channel closes when the last request holding the state has finished.
        if tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .is_err()
        {
            eprintln!("warning: gave up waiting for the last records to be written");
        }
    }
    Ok(())
}

/// Writes records as they come, in batches, until every sender is gone.
async fn write_records(store: Store, mut rx: mpsc::UnboundedReceiver<NewProxyRecord>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < RECORD_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = store.insert_proxy_records(&batch).await {
            eprintln!(
                "warning: cannot record {} answers in `{}`: {e}",
                batch.len(),
                store.path().display()
            );
        }
        batch.clear();
    }
    store.close().await;
}

struct Proxy {
    upstream: Arc<dyn TextGenerator>,
    /// The base URL (never with credentials: [`check_url`]).
    upstream_url: String,
    upstream_model: Option<String>,
    aligner: Arc<dyn TextGenerator>,
    aligner_name: String,
    template: Template,
    template_hash: String,
    sampling: Sampling,
    on_error: OnAlignerError,
    recorder: Option<mpsc::UnboundedSender<NewProxyRecord>>,
    /// USD per million input and output tokens of the Aligner (`--aligner-price`).
    aligner_price: Option<(f64, f64)>,
    /// The name `/v1/models` lists.
    name: String,
    created: u64,
    max_body: usize,
    /// `--stream-correction sentence`.
    sentence: bool,
}

type Shared = Arc<Proxy>;

impl Proxy {
    /// A 502 naming the upstream, logged (the backend has already removed any key from it).
    fn upstream_failed(&self, e: &aligner_backend::Error) -> ApiError {
        tracing::warn!(upstream = %self.upstream_url, error = %e, "upstream failed: answering 502");
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "upstream_error",
            message: format!("the upstream `{}` failed: {e}", self.upstream_url),
            param: None,
            code: Some("upstream_error"),
        }
    }

    /// The error naming the Aligner (a 502, or the note on a passed-through answer), logged.
    fn aligner_failed(&self, e: &aligner_backend::Error) -> ApiError {
        tracing::warn!(aligner = %self.aligner_name, error = %e, "the Aligner failed");
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "aligner_error",
            message: format!(
                "the Aligner `{}` failed: {e}; the upstream answered, and `--on-aligner-error passthrough` would return its answer instead",
                self.aligner_name
            ),
            param: None,
            code: Some("aligner_error"),
        }
    }

    /// The top-level `aligner` object of an answer.
    fn summary(&self, ex: &Exchange) -> Value {
        json!({
            "original": ex.answers[0].text,
            "aligner_model": self.aligner_name,
            "template": self.template.id(),
            "upstream_model": ex.answers[0].model,
        })
    }

    /// Sends one record per choice to the writer (when recording).
    fn record(&self, ex: &Exchange, corrections: &[Result<Completion, String>], aligner: Duration) {
        let Some(tx) = &self.recorder else { return };
        let corrected_at = unix_ms();
        let messages = serde_json::to_string(&ex.messages).unwrap_or_default();
        for (i, (answer, correction)) in ex.answers.iter().zip(corrections).enumerate() {
            let ok = correction.as_ref().ok();
            let _ = tx.send(NewProxyRecord {
                request_id: ex.id.clone(),
                choice: i as i64,
                question: ex.question.clone(),
                messages: messages.clone(),
                answer: answer.text.clone(),
                correction: ok.map(|c| c.text.clone()),
                aligner_error: correction.as_ref().err().cloned(),
                upstream_url: self.upstream_url.clone(),
                upstream_model: answer.model.clone(),
                aligner_model: self.aligner_name.clone(),
                template_id: self.template.id().to_string(),
                template_hash: self.template_hash.clone(),
                answer_finish_reason: Some(answer.finish_reason.as_str().to_string()),
                correction_finish_reason: ok.map(|c| c.finish_reason.as_str().to_string()),
                upstream_prompt_tokens: answer.prompt_tokens,
                upstream_completion_tokens: answer.completion_tokens,
                aligner_prompt_tokens: ok.and_then(|c| c.prompt_tokens),
                aligner_completion_tokens: ok.and_then(|c| c.completion_tokens),
                upstream_ms: Some(millis(ex.upstream_time)),
                aligner_ms: Some(millis(aligner)),
                aligner_cost_usd: ok.and_then(|c| cost(self.aligner_price, c)),
                stream: ex.stream,
                requested_at_ms: ex.requested_ms,
                answered_at_ms: ex.answered_ms,
                corrected_at_ms: ok.map(|_| corrected_at),
                ..Default::default()
            });
        }
    }
}

fn router(state: Shared, max_body: usize, keys: super::ApiKeys) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*name}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { StatusCode::OK }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            keys,
            super::auth::require_key,
        ))
        .with_state(state)
}

const ROUTES: &str = "`GET /v1/models`, `POST /v1/chat/completions` and `GET /health`";

async fn not_found(method: Method, uri: Uri) -> ApiError {
    super::unknown_route(&method, &uri, "this correction proxy", ROUTES)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    super::wrong_method(&method, &uri, "this correction proxy", ROUTES)
}

async fn models(State(p): State<Shared>) -> Json<ModelList> {
    super::model_list(&p.name, p.created)
}

async fn model(
    State(p): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    super::model_lookup(&name, &p.name, p.created, "this proxy lists")
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One request's state once the upstream has answered every choice.
struct Exchange {
    id: String,
    created: u64,
    question: String,
    messages: Vec<Message>,
    /// The upstream's answer per choice.
    answers: Vec<Completion>,
    upstream_time: Duration,
    requested_ms: i64,
    answered_ms: i64,
    stream: bool,
    include_usage: bool,
}

/// What completion `c` cost at `price` (USD per million input and output tokens), when both
/// its token counts are known.
fn cost(price: Option<(f64, f64)>, c: &Completion) -> Option<f64> {
    let (input, output) = price?;
    let (p, o) = (c.prompt_tokens?, c.completion_tokens?);
    Some((f64::from(p) * input + f64::from(o) * output) / 1e6)
}

impl Exchange {
    /// Token counts of both models: the upstream prompt once (as OpenAI counts `n` choices),
    /// every upstream completion, every correction's prompt and completion.
    fn usage(&self, corrections: &[Option<&Completion>], price: Option<(f64, f64)>) -> Value {
        let count = |c: &Completion| {
            (
                u64::from(c.prompt_tokens.unwrap_or(0)),
                u64::from(c.completion_tokens.unwrap_or(0)),
            )
        };
        let up_prompt = self.answers.first().map_or(0, |c| count(c).0);
        let up_completion: u64 = self.answers.iter().map(|c| count(c).1).sum();
        let (al_prompt, al_completion) = corrections
            .iter()
            .flatten()
            .map(|c| count(c))
            .fold((0, 0), |(p, c), (p2, c2)| (p + p2, c + c2));
        let part = |p: u64, c: u64| json!(Usage::new(p, c));
        let mut total = part(up_prompt + al_prompt, up_completion + al_completion);
        total["aligner"] = json!({
            "upstream": part(up_prompt, up_completion),
            "aligner": part(al_prompt, al_completion),
        });
        if let Some((input, output)) = price {
            total["aligner"]["aligner"]["cost_usd"] =
                json!((al_prompt as f64 * input + al_completion as f64 * output) / 1e6);
        }
        total
    }
}

fn body_rejection(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!(
                "the request body is larger than this proxy's limit of {limit} bytes (`--max-body-bytes`)"
            ),
            param: None,
            code: Some("request_too_large"),
        };
    }
    ApiError::invalid(
        None,
        format!("cannot read the request body: {}", e.body_text()),
    )
}

async fn chat(State(p): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let requested_ms = unix_ms();
    answer(p, body, start, requested_ms)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn timing_header(parts: &[(&str, Duration)]) -> HeaderValue {
    let text = parts
        .iter()
        .map(|(name, d)| format!("{name};dur={:.3}", millis(*d)))
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn answer(
    p: Shared,
    body: Result<Bytes, BytesRejection>,
    start: Instant,
    requested_ms: i64,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_rejection(e, p.max_body))?;
    let value = super::parse_body(&body)?;
    let plan = super::plan_value(Endpoint::Chat, &value)?;
    let model = match (&p.upstream_model, value.get("model")) {
        (Some(m), _) => m.clone(),
        (None, Some(Value::String(m))) if !m.trim().is_empty() => m.clone(),
        (None, Some(v)) if !v.is_null() && !v.is_string() => {
            return Err(ApiError::field("model", "must be a string"))
        }
        (None, _) => {
            return Err(ApiError::invalid(
                Some("model"),
                "missing field `model`: this proxy sends the client's `model` upstream (or start it with `--upstream-model NAME`)",
            ))
        }
    };
    let Some((_, first)) = plan.requests.first() else {
        return Err(ApiError::field("n", "must be at least 1"));
    };
    let Prompt::Chat(messages) = &first.prompt else {
        return Err(ApiError::field("messages", "must be chat messages"));
    };
    let Some(last_user) = messages.iter().rposition(|m| m.role == "user") else {
        return Err(ApiError::field(
            "messages",
            "must contain a `user` message: the question the Aligner reads",
        ));
    };
    let question = messages[last_user].content.clone();
    // The conversation before the question (system messages aside), for a template that
    // shows it (`aligner-v1-multiturn`).
    let history: Vec<(String, String)> = messages[..last_user]
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect();
    let turns: Vec<(&str, &str)> = history
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    let messages = if p.recorder.is_some() {
        messages.clone()
    } else {
        Vec::new()
    };

    if p.sentence {
        if plan.requests.len() != 1 {
            return Err(ApiError::field(
                "n",
                "must be 1: `--stream-correction sentence` corrects one answer as it streams",
            ));
        }
        let mut request = first.clone();
        request.model = Some(model);
        let r = sentence::SentenceRequest {
            request,
            question,
            messages,
            stream: plan.stream,
            include_usage: plan.include_usage,
            start,
            requested_ms,
        };
        return sentence::respond(p, r).await;
    }
    // The upstream answers every choice; any failure fails the request.
    let upstream_start = Instant::now();
    let calls = plan.requests.iter().map(|(_, r)| {
        let mut r = r.clone();
        if p.upstream_model.is_none() {
            r.model = Some(model.clone());
        }
        p.upstream.complete(r)
    });
    let results = futures::future::join_all(calls).await;
    let upstream_time = upstream_start.elapsed();
    let mut answers = Vec::with_capacity(results.len());
    for r in results {
        answers.push(r.map_err(|e| p.upstream_failed(&e))?);
    }
    let requests: Vec<CompletionRequest> = answers
        .iter()
        .map(|a| CompletionRequest {
            prompt: Prompt::Raw(p.template.render_turns(&turns, &question, &a.text)),
            sampling: p.sampling.clone(),
            model: None,
        })
        .collect();
    let ex = Exchange {
        id: super::new_id("chatcmpl"),
        created: super::unix_now(),
        question,
        messages,
        answers,
        upstream_time,
        requested_ms,
        answered_ms: unix_ms(),
        stream: plan.stream,
        include_usage: plan.include_usage,
    };
    if plan.stream {
        stream(p, ex, requests).await
    } else {
        whole(p, ex, requests, start).await
    }
}

/// The corrections of every choice at once, then one answer.
async fn whole(
    p: Shared,
    ex: Exchange,
    requests: Vec<CompletionRequest>,
    start: Instant,
) -> Result<Response, ApiError> {
    let aligner_start = Instant::now();
    let calls = requests.into_iter().map(|r| p.aligner.complete(r));
    let results = futures::future::join_all(calls).await;
    let aligner_time = aligner_start.elapsed();
    if p.on_error == OnAlignerError::Fail {
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(p.aligner_failed(e));
        }
    }
    // Passed-through choices carry the Aligner's error in place of a correction.
    let outcomes: Vec<Result<Completion, String>> = results
        .into_iter()
        .map(|r| r.map_err(|e| p.aligner_failed(&e).message))
        .collect();
    let mut choices = Vec::with_capacity(outcomes.len());
    for (i, (answer, outcome)) in ex.answers.iter().zip(&outcomes).enumerate() {
        let mut extra = Map::new();
        extra.insert("aligner_original".into(), json!(answer.text));
        let (content, finish) = match outcome {
            Ok(c) => (&c.text, &c.finish_reason),
            Err(message) => {
                extra.insert("aligner_passthrough".into(), json!(true));
                extra.insert("aligner_error".into(), json!(message));
                (&answer.text, &answer.finish_reason)
            }
        };
        let mut message = AssistantMessage::assistant(content.clone());
        message.extra = extra;
        choices.push(ChatChoice {
            index: i,
            message,
            logprobs: None,
            finish_reason: Some(finish.as_str().to_string()),
        });
    }
    let corrections: Vec<Option<&Completion>> = outcomes.iter().map(|r| r.as_ref().ok()).collect();
    let mut summary = p.summary(&ex);
    summary["passthrough"] = json!(outcomes.iter().any(Result::is_err));
    let body = wire::Completion {
        id: ex.id.clone(),
        object: "chat.completion",
        created: ex.created,
        model: ex.answers[0].model.clone(),
        choices,
        usage: ex.usage(&corrections, p.aligner_price),
        system_fingerprint: None,
        extra: Map::from_iter([("aligner".to_string(), summary)]),
    };
    p.record(&ex, &outcomes, aligner_time);
    let timing = timing_header(&[
        ("upstream", ex.upstream_time),
        ("aligner", aligner_time),
        ("total", start.elapsed()),
    ]);
    let mut response = Json(body).into_response();
    response.headers_mut().insert(SERVER_TIMING.clone(), timing);
    Ok(response)
}

/// The corrections streamed as `chat.completion.chunk` events. Waits for the Aligner's first
/// piece (or failure) before sending headers, so an Aligner that fails at once gets a 502.
async fn stream(
    p: Shared,
    ex: Exchange,
    requests: Vec<CompletionRequest>,
) -> Result<Response, ApiError> {
    let aligner_start = Instant::now();
    let n = requests.len();
    let mut rx = sse::spawn_all(&p.aligner, requests);
    let first = rx.recv().await;
    if let (Some(Progress::Done(_, Err(e))), OnAlignerError::Fail) = (&first, p.on_error) {
        return Err(p.aligner_failed(e));
    }
    let timing = timing_header(&[("upstream", ex.upstream_time)]);
    let mut out = sse::Writer::new(
        ex.id.clone(),
        "chat.completion.chunk",
        ex.created,
        ex.answers[0].model.clone(),
    );
    for i in 0..n {
        let mut delta = AssistantMessage::assistant("");
        delta
            .extra
            .insert("aligner_original".into(), json!(ex.answers[i].text));
        let extra = match i {
            0 => Map::from_iter([("aligner".to_string(), p.summary(&ex))]),
            _ => Map::new(),
        };
        out.chunk(
            vec![chunk_choice(i, delta, None)],
            None::<Option<Value>>,
            extra,
        );
    }
    let handler = ProxyChunks {
        texts: vec![String::new(); n],
        done: (0..n).map(|_| None).collect(),
        remaining: n,
        p,
        ex,
        aligner_start,
    };
    let mut response = sse::respond(rx, first, out, handler);
    response.headers_mut().insert(SERVER_TIMING.clone(), timing);
    Ok(response)
}

fn chunk_choice(index: usize, delta: AssistantMessage, finish: Option<&str>) -> ChunkChoice {
    ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason: finish.map(str::to_string),
        extra: Map::new(),
    }
}

/// Turns the Aligner's progress into chunks: pieces of the corrections, each choice's end, and
/// (passed through) the upstream's answer where the Aligner failed.
struct ProxyChunks {
    p: Shared,
    ex: Exchange,
    /// What has been streamed per choice.
    texts: Vec<String>,
    /// Per choice, once finished: the correction, or the Aligner's error (passed through).
    done: Vec<Option<Result<Completion, String>>>,
    remaining: usize,
    aligner_start: Instant,
}

impl ProxyChunks {
    fn text_chunk(&mut self, out: &mut sse::Writer, i: usize, text: &str) {
        let choice = chunk_choice(i, AssistantMessage::piece(text), None);
        out.chunk(vec![choice], None::<Option<Value>>, Map::new());
    }

    fn finish(&mut self, out: &mut sse::Writer, i: usize, outcome: Result<Completion, String>) {
        let choice = match &outcome {
            Ok(c) => chunk_choice(
                i,
                AssistantMessage::default(),
                Some(c.finish_reason.as_str()),
            ),
            Err(message) => {
                let finish = self.ex.answers[i].finish_reason.as_str();
                let mut choice = chunk_choice(i, AssistantMessage::default(), Some(finish));
                choice
                    .extra
                    .insert("aligner_passthrough".into(), json!(true));
                choice.extra.insert("aligner_error".into(), json!(message));
                choice
            }
        };
        out.chunk(vec![choice], None::<Option<Value>>, Map::new());
        self.done[i] = Some(outcome);
        self.remaining -= 1;
        if self.remaining > 0 {
            return;
        }
        let aligner_time = self.aligner_start.elapsed();
        let outcomes: Vec<Result<Completion, String>> = self
            .done
            .iter_mut()
            .map(|d| d.take().unwrap_or_else(|| Err(String::new())))
            .collect();
        if self.ex.include_usage {
            let corrections: Vec<Option<&Completion>> =
                outcomes.iter().map(|r| r.as_ref().ok()).collect();
            let usage = self.ex.usage(&corrections, self.p.aligner_price);
            out.chunk(Vec::<ChunkChoice>::new(), Some(Some(usage)), Map::new());
        }
        self.p.record(&self.ex, &outcomes, aligner_time);
        out.done();
    }
}

impl sse::Handler for ProxyChunks {
    fn handle(&mut self, progress: Progress, out: &mut sse::Writer) {
        match progress {
            Progress::Text(i, text) => {
                if !text.is_empty() {
                    self.texts[i].push_str(&text);
                    self.text_chunk(out, i, &text);
                }
            }
            Progress::Done(i, Ok(c)) => self.finish(out, i, Ok(c)),
            Progress::Done(i, Err(e))
                if self.p.on_error == OnAlignerError::Passthrough && self.texts[i].is_empty() =>
            {
                let original = self.ex.answers[i].text.clone();
                if !original.is_empty() {
                    self.text_chunk(out, i, &original);
                }
                let message = self.p.aligner_failed(&e).message;
                self.finish(out, i, Err(message));
            }
            Progress::Done(_, Err(e)) => {
                // Headers are sent: the error goes in the stream, as OpenAI clients expect.
                let body = self.p.aligner_failed(&e).body();
                out.raw(serde_json::to_string(&body).expect("an error body serializes"));
                out.done();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_are_refused_without_echoing_them() {
        let err = check_url(
            "upstream",
            "upstream-api-key-env",
            "http://me:sk-123@host/v1",
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("sk-123"), "{err}");
        assert!(err.contains("--upstream-api-key-env"), "{err}");
        assert!(check_url("upstream", "k", "localhost:8000/v1").is_err());
        assert!(check_url("upstream", "k", "http:///v1").is_err());
        assert!(check_url("upstream", "k", "http://h/v1?key=1").is_err());
        assert_eq!(
            check_url("upstream", "k", "http://h:1/v1/").unwrap(),
            "http://h:1/v1"
        );
    }

    #[test]
    fn a_checkpoint_template_is_used_and_another_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = LocalModel {
            source: LocalSource::HfFolder {
                path: dir.path().to_path_buf(),
                architecture: None,
            },
            dtype: "auto".into(),
        };
        assert_eq!(
            resolve_template(None, Some(&model)).unwrap(),
            Template::AlignerV1
        );
        let meta = json!({
            "aligner_template": "aligner-general",
            "extra": {"template_text": Template::AlignerGeneral.text()},
        });
        std::fs::write(dir.path().join("aligner.json"), meta.to_string()).unwrap();
        assert_eq!(
            resolve_template(None, Some(&model)).unwrap(),
            Template::AlignerGeneral
        );
        let err = resolve_template(Some("aligner-v1"), Some(&model))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`aligner-general`") && err.contains("aligner.json"),
            "{err}"
        );
        let err = resolve_template(Some("nope"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`aligner-v1`"), "{err}");
    }

    #[test]
    fn usage_counts_the_upstream_prompt_once_and_every_correction() {
        let c = |p, c| Completion {
            text: String::new(),
            finish_reason: aligner_backend::FinishReason::Stop,
            model: "m".into(),
            prompt_tokens: Some(p),
            completion_tokens: Some(c),
            latency: Duration::ZERO,
            attempts: 1,
            replica: None,
        };
        let ex = Exchange {
            id: String::new(),
            created: 0,
            question: String::new(),
            messages: Vec::new(),
            answers: vec![c(10, 5), c(10, 7)],
            upstream_time: Duration::ZERO,
            requested_ms: 0,
            answered_ms: 0,
            stream: false,
            include_usage: false,
        };
        let (a, b) = (c(20, 4), c(22, 6));
        let u = ex.usage(&[Some(&a), Some(&b)], None);
        assert_eq!(u["prompt_tokens"], 52);
        assert_eq!(u["completion_tokens"], 22);
        assert_eq!(u["total_tokens"], 74);
        assert_eq!(u["aligner"]["upstream"]["total_tokens"], 22);
        assert_eq!(u["aligner"]["aligner"]["prompt_tokens"], 42);
    }
}
