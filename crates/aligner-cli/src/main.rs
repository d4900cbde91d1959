//! `aligner`: validate, run and inspect Aligner bootstrapping pipelines.
//!
//! Exit codes are decided here and nowhere else: 0 success, 1 failure, 2 invalid input (a
//! pipeline that does not validate, bad arguments), 3 refused (the run is leased by another
//! process, or its spec changed), 130 interrupted.

mod backends;
mod commands;
mod daemon;
mod fetch;
mod output;
mod progress;
mod serve;
mod train;

use clap::Parser;

fn main() {
    let cli = commands::Cli::parse();
    // Training reuses its large activation buffers instead of page-faulting them in again.
    aligner_train::tune_allocator();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(commands::dispatch(cli));
    let code = match result {
        Ok(()) => 0,
        Err(err) => {
            let code = exit_code(&err);
            if !matches!(
                err.downcast_ref::<commands::Invalid>(),
                Some(commands::Invalid::Silent)
            ) {
                eprintln!("{}", output::render_error(&err));
            }
            code
        }
    };
    // Don't wait for in-flight HTTP connections to wind down.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

fn exit_code(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<commands::Invalid>().is_some() {
        return 2;
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<aligner_engine::Error>() {
            return match e {
                aligner_engine::Error::Interrupted { .. } => 130,
                aligner_engine::Error::BudgetReached { .. } => 4,
                aligner_engine::Error::SpecChanged { .. }
                | aligner_engine::Error::LeaseLost { .. } => 3,
                aligner_engine::Error::Store(aligner_store::Error::LeaseHeld { .. }) => 3,
                _ => 1,
            };
        }
        if let Some(aligner_store::Error::LeaseHeld { .. }) =
            cause.downcast_ref::<aligner_store::Error>()
        {
            return 3;
        }
        if cause.downcast_ref::<aligner_spec::Errors>().is_some() {
            return 2;
        }
    }
    1
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .try_init();
}
