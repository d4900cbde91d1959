//! `aligner serve`'s flags; the servers themselves are `aligner-server`.

use aligner_server::proxy::ProxyOptions;
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
    pub proxy: ProxyOptions,
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
        proxy: args.proxy,
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
