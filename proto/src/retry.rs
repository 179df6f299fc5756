//! "Come back later": how a busy replica tells a client when to retry.
//!
//! A replica that refuses a session because it is busy (admission control,
//! a node's hello budget) answers `UNAVAILABLE` with the metadata
//! [`RETRY_AFTER_MS`]: its estimate of when a retry would be served. The
//! agent waits at least that long (with jitter) instead of its own short
//! backoff, so a fleet reconnecting at once spreads itself over the time
//! the replica needs instead of retrying into the same queue, each retry
//! costing a TLS handshake.

use std::time::Duration;

/// The metadata key of the hint (milliseconds, decimal).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The longest hint a client honours (a hostile or broken server cannot
/// park an agent for longer).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// `status` with the hint `after`.
pub fn with_retry_after(mut status: tonic::Status, after: Duration) -> tonic::Status {
    let ms = after.min(MAX_RETRY_AFTER).as_millis().to_string();
    if let Ok(value) = ms.parse() {
        status.metadata_mut().insert(RETRY_AFTER_MS, value);
    }
    status
}

/// The hint `status` carries, at most [`MAX_RETRY_AFTER`]; `None` when it
/// has none (or one that is not a number).
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_are_bounded() {
        let status = with_retry_after(
            tonic::Status::unavailable("busy"),
            Duration::from_millis(2500),
        );
        assert_eq!(retry_after(&status), Some(Duration::from_millis(2500)));
        let huge = with_retry_after(
            tonic::Status::unavailable("busy"),
            Duration::from_secs(86_400),
        );
        assert_eq!(retry_after(&huge), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&tonic::Status::unavailable("busy")), None);
        let mut garbage = tonic::Status::unavailable("busy");
        garbage
            .metadata_mut()
            .insert(RETRY_AFTER_MS, "soon".parse().expect("ascii"));
        assert_eq!(retry_after(&garbage), None);
    }
}
