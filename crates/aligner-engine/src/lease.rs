//! The run lease: one process drives a run at a time. The holder renews it every few seconds;
//! a holder that died (kill -9) is recognised at once when it ran on this host, else its lease
//! simply expires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aligner_store::Store;

const TTL_MS: i64 = 30_000;
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// `pid 1234 on host-name`: who holds a lease, readable in errors and in `runs.lease_holder`.
pub fn holder_id() -> String {
    format!("pid {} on {}", std::process::id(), hostname())
}

/// The holder string names a process on this host that no longer exists.
pub fn holder_is_dead(holder: &str) -> bool {
    let Some((pid, host)) = holder
        .strip_prefix("pid ")
        .and_then(|r| r.split_once(" on "))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == hostname()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) struct Lease {
    run_id: i64,
    holder: String,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the lease; if it is ever lost, `on_lost` is raised so the stages stop like on an
    /// interrupt.
    pub(crate) async fn acquire(
        store: &Store,
        run_id: i64,
        on_lost: Arc<AtomicBool>,
    ) -> Result<Lease, aligner_store::Error> {
        let holder = holder_id();
        let current = store.run(run_id).await?.lease_holder;
        let stale = current.filter(|h| holder_is_dead(h));
        store
            .acquire_lease(run_id, &holder, now_ms(), TTL_MS, stale.as_deref())
            .await?;
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (store, holder, lost) = (store.clone(), holder.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    match store.renew_lease(run_id, &holder, now_ms(), TTL_MS).await {
                        Ok(true) => {}
                        Ok(false) => {
                            lost.store(true, Ordering::Relaxed);
                            on_lost.store(true, Ordering::Relaxed);
                            tracing::error!(
                                "lost the lease on run {run_id} to another process; stopping"
                            );
                            return;
                        }
                        Err(e) => tracing::warn!("could not renew the lease on run {run_id}: {e}"),
                    }
                }
            })
        };
        Ok(Lease {
            run_id,
            holder,
            lost,
            heartbeat,
        })
    }

    pub(crate) fn holder(&self) -> &str {
        &self.holder
    }

    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    pub(crate) async fn release(self, store: &Store) {
        self.heartbeat.abort();
        if let Err(e) = store.release_lease(self.run_id, &self.holder).await {
            tracing::warn!("could not release the lease on run {}: {e}", self.run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_holders_on_this_host_are_recognised() {
        let me = holder_id();
        assert!(!holder_is_dead(&me), "we are alive");
        assert!(holder_is_dead(&format!("pid 4000000 on {}", hostname())));
        assert!(!holder_is_dead("pid 4000000 on some-other-host"));
        assert!(!holder_is_dead("garbage"));
    }
}
