//! Generation across a fleet: four loopback replicas of one model, each the bottleneck (it
//! answers 4 requests at a time in 100 ms), against one replica alone; one of the four is
//! killed a quarter of the way through. Prints requests per second before and after the
//! kill, and checks that every request got exactly one answer.
//!
//!     cargo bench -p aligner-openai --bench fleet

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aligner_backend::{CompletionRequest, Prompt, Sampling, TextGenerator};
use aligner_mockserver::{spawn_in_thread, MockConfig};
use aligner_openai::{Config, Fleet};

const LATENCY: Duration = Duration::from_millis(100);
const CAPACITY: usize = 4;

fn server() -> aligner_mockserver::MockServer {
    spawn_in_thread(MockConfig {
        latency: LATENCY,
        capacity: Some(CAPACITY),
        ..Default::default()
    })
}

fn request(i: usize) -> CompletionRequest {
    CompletionRequest {
        prompt: Prompt::Raw(format!("request {i}")),
        sampling: Sampling::default(),
        model: None,
    }
}

/// Sends `n` requests through `fleet` (64 in flight); `at_quarter` runs once a quarter of them
/// are answered. Returns (seconds to the quarter, seconds for the rest, answers per replica).
async fn drive(
    fleet: Fleet,
    n: usize,
    at_quarter: impl FnOnce() + Send + 'static,
) -> (f64, f64, BTreeMap<String, usize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let quarter = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let hook = Arc::new(std::sync::Mutex::new(Some(at_quarter)));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (fleet, done, quarter, hook, sem) = (
            fleet.clone(),
            done.clone(),
            quarter.clone(),
            hook.clone(),
            sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let c = fleet.complete(request(i)).await;
            let k = done.fetch_add(1, Ordering::SeqCst) + 1;
            if k == n / 4 {
                *quarter.lock().unwrap() = Some(Instant::now());
                if let Some(f) = hook.lock().unwrap().take() {
                    tokio::task::spawn_blocking(f);
                }
            }
            c
        }));
    }
    let mut by = BTreeMap::new();
    for t in tasks {
        let c = t.await.unwrap().expect("every request is answered");
        *by.entry(c.replica.unwrap()).or_insert(0) += 1;
    }
    let end = Instant::now();
    let q = quarter.lock().unwrap().unwrap();
    ((q - start).as_secs_f64(), (end - q).as_secs_f64(), by)
}

fn fleet(urls: &[String]) -> Fleet {
    let mut config = Config::new("http://unused/v1", "m");
    config.max_concurrency = 64;
    config.timeout = Duration::from_secs(10);
    Fleet::new(config, urls, 16).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n1 = 200;
    let one = server();
    let (q1, rest1, _) = drive(fleet(std::slice::from_ref(&one.base_url)), n1, || {}).await;
    let single = n1 as f64 / (q1 + rest1);
    drop(one);

    let n4 = 800;
    let servers: Vec<_> = (0..4).map(|_| server()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.base_url.clone()).collect();
    let mut servers = servers.into_iter();
    let victim = servers.next().unwrap();
    let rest: Vec<_> = servers.collect();
    let (q4, after, by) = drive(fleet(&urls), n4, move || victim.shutdown()).await;
    let before = (n4 / 4) as f64 / q4;
    let after_rate = (n4 - n4 / 4) as f64 / after;
    let answered: usize = by.values().sum();
    println!("one replica:            {single:7.1} requests/s ({n1} requests)");
    println!(
        "four replicas:          {before:7.1} requests/s before the kill ({:.2}x one)",
        before / single
    );
    println!(
        "after one is killed:    {after_rate:7.1} requests/s ({:.2}x one)",
        after_rate / single
    );
    println!(
        "answers: {answered} of {n4}, per replica: {:?}",
        by.values().collect::<Vec<_>>()
    );
    assert_eq!(answered, n4, "every request answered exactly once");
    drop(rest);
}
