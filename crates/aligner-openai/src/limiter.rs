//! Smooth token-bucket rate limiting (requests or tokens per minute).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket that refills continuously and lets callers reserve amounts in arrival
/// order: a reservation that overdraws the bucket waits until the debt is repaid, so the
/// long-run rate is the configured one and waiters wake in turn rather than all at once.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    rate_per_sec: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// Negative while callers are waiting for earlier reservations.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket allowing `limit` per minute with a small burst: capacity `max(1, limit / 60)`.
    /// `limit` must be positive.
    pub fn per_minute(limit: u32) -> Self {
        let rate = f64::from(limit.max(1)) / 60.0;
        Self::new(rate.max(1.0), rate)
    }

    /// A bucket of `capacity` refilling at `rate_per_sec`; it starts full.
    pub fn new(capacity: f64, rate_per_sec: f64) -> Self {
        Self {
            capacity,
            rate_per_sec,
            state: Mutex::new(BucketState {
                tokens: capacity,
                last: Instant::now(),
            }),
        }
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refill(&self, s: &mut BucketState) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate_per_sec).min(self.capacity);
        s.last = now;
    }

    /// Takes `amount` now and says how long the caller must wait before using it.
    pub fn reserve(&self, amount: f64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s);
        s.tokens -= amount.max(0.0);
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.rate_per_sec)
        }
    }

    /// Reserves `amount` and sleeps until it is available.
    pub async fn acquire(&self, amount: f64) {
        let wait = self.reserve(amount);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Corrects an earlier reservation: a positive `delta` gives tokens back (the request used
    /// fewer than estimated), a negative one charges more. Never fills past capacity.
    pub fn adjust(&self, delta: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s);
        s.tokens = (s.tokens + delta).min(self.capacity);
    }

    /// Tokens available now (negative while reservations are outstanding).
    pub fn available(&self) -> f64 {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut s);
        s.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_are_spaced() {
        // 60 rpm: capacity 1, one per second.
        let bucket = TokenBucket::per_minute(60);
        assert_eq!(bucket.capacity(), 1.0);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            bucket.acquire(1.0).await;
            at.push((Instant::now() - start).as_millis());
        }
        assert_eq!(at, vec![0, 1000, 2000, 3000, 4000]);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_get_their_turns() {
        let bucket = std::sync::Arc::new(TokenBucket::per_minute(600)); // 10/s, burst 10
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let b = bucket.clone();
            set.spawn(async move {
                b.acquire(1.0).await;
                Instant::now() - start
            });
        }
        let mut times: Vec<u128> = set
            .join_all()
            .await
            .into_iter()
            .map(|d| d.as_millis())
            .collect();
        times.sort_unstable();
        assert!(times[..10].iter().all(|t| *t == 0), "{times:?}");
        assert_eq!(times[10], 100);
        assert_eq!(times[29], 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn token_estimates_are_corrected() {
        // 6000 tpm: 100 tokens/s, capacity 100.
        let bucket = TokenBucket::per_minute(6000);
        assert_eq!(bucket.capacity(), 100.0);
        // A request bigger than the burst waits for the debt to be repaid.
        assert_eq!(bucket.reserve(300.0), Duration::from_secs(2));
        // It actually used 100: refund 200, so the next one may go at once.
        bucket.adjust(200.0);
        assert_eq!(bucket.reserve(0.0), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(bucket.available(), 100.0); // capped at capacity
        bucket.adjust(-150.0);
        assert_eq!(bucket.reserve(50.0), Duration::from_secs(1));
    }
}
