//! Backoff delays and `Retry-After` parsing for retried requests.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// Default first backoff ceiling (`Config::backoff_base`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Exponential backoff never exceeds this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server's `Retry-After` is honoured up to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// The upper bound of the jittered wait after failed attempt `attempt` (0-based):
/// `base * 2^attempt`, capped at [`MAX_BACKOFF`].
pub fn backoff_ceiling(base: Duration, attempt: u32) -> Duration {
    let factor = 2f64.powi(attempt.min(62) as i32);
    let secs = (base.as_secs_f64() * factor).min(MAX_BACKOFF.as_secs_f64());
    Duration::from_secs_f64(secs)
}

/// The wait before the next attempt, as a pure function of its inputs: the server's
/// `retry_after` (capped at [`MAX_RETRY_AFTER`]) when given, else full jitter,
/// `jitter * backoff_ceiling(base, attempt)` with `jitter` in `[0, 1]`.
pub fn backoff_delay_with(
    base: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if let Some(ra) = retry_after {
        return ra.min(MAX_RETRY_AFTER);
    }
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        1.0
    };
    backoff_ceiling(base, attempt).mul_f64(jitter)
}

/// [`backoff_delay_with`] with the default 0.5 s base and a random jitter.
pub fn backoff_delay(attempt: u32, retry_after: Option<Duration>) -> Duration {
    backoff_delay_with(
        DEFAULT_BACKOFF_BASE,
        attempt,
        retry_after,
        rand::random::<f64>(),
    )
}

/// A `Retry-After` value: delay seconds (integer, or decimal as some proxies send) or an
/// HTTP date (a date in the past means "now").
pub fn parse_retry_after_value(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(1e9)));
        }
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait a response asks for: `retry-after-ms` (OpenAI) or `Retry-After`.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms.min(1e12) / 1000.0));
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after_value(value, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = DEFAULT_BACKOFF_BASE;

    #[test]
    fn ceiling_doubles_and_caps() {
        assert_eq!(backoff_ceiling(BASE, 0), Duration::from_millis(500));
        assert_eq!(backoff_ceiling(BASE, 1), Duration::from_secs(1));
        assert_eq!(backoff_ceiling(BASE, 3), Duration::from_secs(4));
        assert_eq!(backoff_ceiling(BASE, 6), MAX_BACKOFF);
        assert_eq!(backoff_ceiling(BASE, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn full_jitter_stays_within_ceiling() {
        assert_eq!(backoff_delay_with(BASE, 2, None, 0.0), Duration::ZERO);
        assert_eq!(
            backoff_delay_with(BASE, 2, None, 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff_delay_with(BASE, 2, None, 0.5),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff_delay_with(BASE, 2, None, 7.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff_delay_with(BASE, 2, None, f64::NAN),
            Duration::from_secs(2)
        );
        for attempt in 0..20 {
            let d = backoff_delay(attempt, None);
            assert!(d <= backoff_ceiling(BASE, attempt), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let ra = Some(Duration::from_secs(3));
        assert_eq!(backoff_delay_with(BASE, 5, ra, 0.0), Duration::from_secs(3));
        assert_eq!(backoff_delay(0, ra), Duration::from_secs(3));
        assert_eq!(
            backoff_delay(0, Some(Duration::from_secs(600))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after_value("7", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after_value(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after_value("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after_value("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after_value("soon", now), None);
        assert_eq!(parse_retry_after_value("-3", now), None);

        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_millis(250)));
    }
}
