//! Runs the loopback test server on a fixed port, for trying the CLI by hand during development:
//!
//!     cargo run -p aligner-mockserver --example serve -- 8000 [p_fault]
//!
//! It answers deterministically ("answer: <question>", "I corrected this: <answer>") and, with
//! `p_fault`, injects 429s, 500s and malformed bodies at that rate each. It is a test double, not
//! a model.

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8000);
    let p: f64 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let config = aligner_mockserver::MockConfig {
        p_429: p,
        p_500: p,
        p_malformed: p,
        latency: std::time::Duration::from_millis(5),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let server = aligner_mockserver::MockServer::start_on(addr, config)
            .await
            .expect("start");
        eprintln!("test server on {}", server.base_url);
        tokio::signal::ctrl_c().await.ok();
    });
}
