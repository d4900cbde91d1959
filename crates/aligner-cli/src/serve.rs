//! `aligner serve`'s flags; the servers themselves are `aligner-server`.

use std::path::PathBuf;

use aligner_server::proxy::{AlignerEndpoint, OnAlignerError, ProxyOptions};
use aligner_server::ServeOptions;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A `.gguf` file, a Hugging Face model folder, or a hub id `org/name`. Not with
    /// `--upstream`, where the Aligner is `--aligner MODEL`.
    pub model: Option<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients see (default: the file or folder name, or the hub id).
    #[arg(long)]
    pub name: Option<String>,
    /// Most sequences generated together (default: the backend's).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// A key clients must send as `Authorization: Bearer KEY` (repeatable; or
    /// ALIGNER_API_KEYS=key1,key2). Required with a `--host` beyond loopback.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "ALIGNER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// The correction proxy's options (`--upstream` turns it on).
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Correction proxy (with --upstream)")]
pub struct ProxyArgs {
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
    /// How `--aligner-url` gets the rendered template: `completions` (raw `/completions`) or
    /// `chat` (the user message of `/chat/completions`, for chat-only servers)
    /// [default: completions].
    #[arg(long, value_name = "API", value_parser = ["completions", "chat"])]
    pub aligner_endpoint: Option<String>,
    /// Seconds to wait for a correction from `--aligner-url`, per attempt [default: 120].
    #[arg(long, value_name = "SECS")]
    pub aligner_timeout: Option<f64>,
    /// Retries of a failed call to `--aligner-url` [default: 2].
    #[arg(long, value_name = "N")]
    pub aligner_retries: Option<u32>,
    /// The correction template: `aligner-v1`, `aligner-general` or `aligner-empathy`
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
    #[arg(long, value_name = "WHAT", value_parser = ["fail", "passthrough"])]
    pub on_aligner_error: Option<String>,
    /// Record every question, answer and correction in this SQLite store (`proxy_records`).
    #[arg(long, value_name = "STORE")]
    pub record: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger ones get 413 [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Requests in flight to each model at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<u32>,
    /// The Aligner's price in USD per million input and output tokens (`0.15,0.60`): each
    /// response's usage, and each record, says what the correction cost.
    #[arg(long, value_name = "INPUT,OUTPUT")]
    pub aligner_price: Option<String>,
}

impl From<ProxyArgs> for ProxyOptions {
    fn from(a: ProxyArgs) -> Self {
        ProxyOptions {
            upstream: a.upstream,
            upstream_model: a.upstream_model,
            upstream_api_key_env: a.upstream_api_key_env,
            upstream_timeout: a.upstream_timeout,
            upstream_retries: a.upstream_retries,
            aligner: a.aligner,
            aligner_url: a.aligner_url,
            aligner_model: a.aligner_model,
            aligner_api_key_env: a.aligner_api_key_env,
            aligner_endpoint: a.aligner_endpoint.map(|e| match e.as_str() {
                "chat" => AlignerEndpoint::Chat,
                _ => AlignerEndpoint::Completions,
            }),
            aligner_timeout: a.aligner_timeout,
            aligner_retries: a.aligner_retries,
            template: a.template,
            aligner_max_tokens: a.aligner_max_tokens,
            aligner_temperature: a.aligner_temperature,
            on_aligner_error: a.on_aligner_error.map(|w| match w.as_str() {
                "passthrough" => OnAlignerError::Passthrough,
                _ => OnAlignerError::Fail,
            }),
            record: a.record,
            max_body_bytes: a.max_body_bytes,
            max_concurrency: a.max_concurrency,
            aligner_price: a.aligner_price,
        }
    }
}

/// `aligner serve`: serves until the first Ctrl-C or SIGTERM, then finishes the requests in
/// flight (a second Ctrl-C exits at once).
pub async fn run(args: ServeArgs) -> Result<()> {
    let options = ServeOptions {
        model: args.model,
        host: args.host,
        port: args.port,
        name: args.name,
        max_batch: args.max_batch,
        api_keys: args.api_keys,
        proxy: args.proxy.into(),
    };
    let shutdown = async {
        aligner_engine::shutdown_signal().await;
        eprintln!("shutting down: finishing requests in flight (press Ctrl-C again to stop now)");
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    };
    aligner_server::run(options, shutdown, |line| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
    .await
}
