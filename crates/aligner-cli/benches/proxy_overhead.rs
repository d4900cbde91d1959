//! The correction proxy's own overhead: 64 concurrent clients send chat completions through
//! `aligner serve --upstream ... --aligner-url ...` whose upstream and Aligner are loopback
//! test servers, and the same calls are made directly to the two servers for comparison.
//!
//!     cargo bench -p aligner-cli --bench proxy_overhead
//!     ALIGNER_BENCH_CLIENTS=64 ALIGNER_BENCH_REQUESTS=200 ALIGNER_BENCH_LATENCY_MS=0,20 \
//!         cargo bench -p aligner-cli --bench proxy_overhead
//!
//! Per request through the proxy, overhead = end-to-end latency seen by the client minus the
//! time the proxy spent awaiting the upstream and the Aligner (its `Server-Timing` header).
//! Directly, a client calls the upstream, then the Aligner with the prompt the proxy would
//! send; "proxy - direct" compares the two end-to-end latencies. Each client keeps one
//! keep-alive connection per server and sends its requests one after another; the first
//! `ALIGNER_BENCH_WARMUP` requests per client are not counted. `ALIGNER_BENCH_LATENCY_MS` is
//! the test servers' added latency per answer (a list runs one round per value);
//! `ALIGNER_BIN` overrides the `aligner` binary.

use std::time::{Duration, Instant};

use aligner_mockserver::{MockConfig, MockServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
}

struct Reply {
    status: u16,
    /// Milliseconds awaiting the models, from `Server-Timing` (`upstream` + `aligner`).
    model_ms: Option<f64>,
    body: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> Reply {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).await.expect("write");
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).expect("ascii head");
        let status: u16 = head[9..12].parse().expect("status");
        let mut length = None;
        let mut model_ms = None;
        for line in head.lines().skip(1) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                length = v.trim().parse::<usize>().ok();
            } else if k == "server-timing" {
                model_ms = Some(models_ms(v));
            }
        }
        let length = length.expect("a content-length (no chunked answers here)");
        let start = head_end + 4;
        while self.buf.len() < start + length {
            let n = self.stream.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "connection closed mid-body");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Reply {
            status,
            model_ms,
            body: self.buf[start..start + length].to_vec(),
        }
    }
}

/// `upstream;dur=X, aligner;dur=Y, total;dur=Z` -> X + Y.
fn models_ms(header: &str) -> f64 {
    header
        .split(',')
        .filter_map(|part| {
            let (name, dur) = part.trim().split_once(";dur=")?;
            matches!(name, "upstream" | "aligner")
                .then(|| dur.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn summarize(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    Summary {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
        mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
    }
}

fn question(client: usize, i: usize) -> String {
    format!("Benchmark question {client}-{i}: how do I keep a sourdough starter alive?")
}

fn proxy_body(q: &str) -> Vec<u8> {
    json!({"model": "mock-upstream", "messages": [{"role": "user", "content": q}], "max_tokens": 64})
        .to_string()
        .into_bytes()
}

/// Per request: (end-to-end ms, ms awaiting the models).
async fn through_proxy(addr: String, client: usize, warmup: usize, n: usize) -> Vec<(f64, f64)> {
    let mut conn = Conn::open(&addr).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let body = proxy_body(&question(client, i));
        let start = Instant::now();
        let reply = conn.post("/v1/chat/completions", &body).await;
        let e2e = start.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        if i >= warmup {
            out.push((e2e, reply.model_ms.expect("a Server-Timing header")));
        }
    }
    out
}

/// Per request: end-to-end ms of the upstream call followed by the Aligner call.
async fn direct(
    upstream: String,
    aligner: String,
    client: usize,
    warmup: usize,
    n: usize,
) -> Vec<f64> {
    let mut up = Conn::open(&upstream).await;
    let mut al = Conn::open(&aligner).await;
    let mut out = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let q = question(client, i);
        // The bodies the proxy's backend sends.
        let body = json!({"model": "mock-upstream", "messages": [{"role": "user", "content": q}], "max_tokens": 64, "n": 1, "stream": false}).to_string();
        let start = Instant::now();
        let reply = up.post("/v1/chat/completions", body.as_bytes()).await;
        assert_eq!(reply.status, 200);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        let prompt = aligner_spec::Template::AlignerV1.render(&q, answer);
        let body = json!({"model": "mock-aligner", "prompt": prompt, "temperature": 0.0, "max_tokens": 512, "n": 1, "stream": false}).to_string();
        let reply = al.post("/v1/completions", body.as_bytes()).await;
        assert_eq!(reply.status, 200);
        let e2e = start.elapsed().as_secs_f64() * 1000.0;
        if i >= warmup {
            out.push(e2e);
        }
    }
    out
}

/// `aligner serve --upstream ...` on a free port; returns the child and `host:port`.
fn start_proxy(upstream: &MockServer, aligner: &MockServer) -> (std::process::Child, String) {
    use std::io::BufRead;
    let bin = std::env::var("ALIGNER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_aligner").into());
    let mut child = std::process::Command::new(bin)
        .args([
            "serve",
            "--port",
            "0",
            "--upstream",
            &upstream.base_url,
            "--upstream-model",
            "mock-upstream",
            "--aligner-url",
            &aligner.base_url,
            "--aligner-model",
            "mock-aligner",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the proxy");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap_or_default();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    assert!(addr.contains(':'), "unexpected proxy line: {line:?}");
    (child, addr)
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat` (Linux; in
/// USER_HZ ticks, 100 per second).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn addr_of(server: &MockServer) -> String {
    server.addr.to_string()
}

fn main() {
    let clients = env_or("ALIGNER_BENCH_CLIENTS", 64);
    let requests = env_or("ALIGNER_BENCH_REQUESTS", 200);
    let warmup = env_or("ALIGNER_BENCH_WARMUP", 10);
    let latencies: Vec<u64> = std::env::var("ALIGNER_BENCH_LATENCY_MS")
        .unwrap_or_else(|_| "0,20".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "proxy overhead: {clients} clients x {requests} requests (+{warmup} warm-up each), {cores} cores, load average before: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, 4))
        .enable_all()
        .build()
        .unwrap();
    for latency_ms in latencies {
        let config = MockConfig {
            latency: Duration::from_millis(latency_ms),
            ..Default::default()
        };
        let upstream = aligner_mockserver::spawn_in_thread(config.clone());
        let aligner = aligner_mockserver::spawn_in_thread(config);
        let (mut child, proxy) = start_proxy(&upstream, &aligner);

        let cpu_before = cpu_secs(child.id());
        let start = Instant::now();
        let per_client: Vec<Vec<(f64, f64)>> = runtime.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|c| tokio::spawn(through_proxy(proxy.clone(), c, warmup, requests)))
                .collect();
            futures::future::join_all(tasks)
                .await
                .into_iter()
                .map(|r| r.expect("client task"))
                .collect()
        });
        let proxy_secs = start.elapsed().as_secs_f64();
        let proxy_cpu = cpu_secs(child.id())
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let (up, al) = (addr_of(&upstream), addr_of(&aligner));
        let start = Instant::now();
        let direct_runs: Vec<Vec<f64>> = runtime.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|c| tokio::spawn(direct(up.clone(), al.clone(), c, warmup, requests)))
                .collect();
            futures::future::join_all(tasks)
                .await
                .into_iter()
                .map(|r| r.expect("client task"))
                .collect()
        });
        let direct_secs = start.elapsed().as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();

        let all: Vec<(f64, f64)> = per_client.into_iter().flatten().collect();
        let n = all.len();
        let e2e = summarize(all.iter().map(|(e, _)| *e).collect());
        let models = summarize(all.iter().map(|(_, m)| *m).collect());
        let overhead = summarize(all.iter().map(|(e, m)| e - m).collect());
        let direct = summarize(direct_runs.into_iter().flatten().collect());
        println!("\nmodel latency {latency_ms} ms per call ({n} requests each way)");
        println!(
            "  {:<28} {:>9} {:>9} {:>9} {:>9}",
            "ms", "p50", "p99", "max", "mean"
        );
        for (name, s) in [
            ("proxy overhead (e2e-models)", &overhead),
            ("through the proxy, e2e", &e2e),
            ("  of which awaiting models", &models),
            ("direct upstream+aligner", &direct),
        ] {
            println!(
                "  {name:<28} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                s.p50, s.p99, s.max, s.mean
            );
        }
        println!(
            "  proxy - direct: p50 {:+.3} ms, p99 {:+.3} ms; throughput {:.0} req/s through the proxy, {:.0} req/s direct",
            e2e.p50 - direct.p50,
            e2e.p99 - direct.p99,
            (clients * (requests + warmup)) as f64 / proxy_secs,
            (clients * (requests + warmup)) as f64 / direct_secs,
        );
        if let Some(cpu) = proxy_cpu {
            println!(
                "  proxy process CPU: {:.0} us per request ({:.2} cores busy on average)",
                cpu * 1e6 / (clients * (requests + warmup)) as f64,
                cpu / proxy_secs
            );
        }
    }
}
