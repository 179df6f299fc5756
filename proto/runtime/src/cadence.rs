//! How often an agent heartbeats: its own interval, unless the replica it
//! talks to asks for sparser heartbeats (`HeartbeatAck.heartbeat_interval_ms`).
//!
//! A replica has a heartbeat budget; one serving more agents than that
//! spreads their heartbeats out, so its idle cost stays bounded however
//! many agents it serves (10,000 agents at one heartbeat a second each
//! cost a replica half a core in TLS and HTTP/2 alone). The agent and
//! bench-fleet's simulated agents keep the same rhythm through [`Cadence`].

use std::time::Duration;

/// The sparsest heartbeats a replica can ask for.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// An agent's heartbeat rhythm and the ack timeout that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    own: Duration,
    own_ack_timeout: Duration,
    interval: Duration,
}

impl Cadence {
    /// The agent's own interval and ack timeout (from its config).
    pub fn new(own: Duration, own_ack_timeout: Duration) -> Self {
        Self {
            own,
            own_ack_timeout,
            interval: own,
        }
    }

    /// Heartbeats go this far apart now.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long without an ack means the replica is gone: the configured
    /// timeout, stretched as the interval is (it stays the same number of
    /// missed heartbeats).
    pub fn ack_timeout(&self) -> Duration {
        if self.own.is_zero() {
            return self.own_ack_timeout;
        }
        self.own_ack_timeout
            .mul_f64(self.interval.as_secs_f64() / self.own.as_secs_f64())
    }

    /// Whether heartbeats are sparser than the agent's own.
    pub fn stretched(&self) -> bool {
        self.interval > self.own
    }

    /// The replica asked for `hint_ms` between heartbeats (0: the agent's
    /// own interval). Returns the new interval when it changed. The agent
    /// never beats faster than its own interval nor slower than
    /// [`MAX_INTERVAL`], whatever a replica says.
    pub fn hinted(&mut self, hint_ms: u32) -> Option<Duration> {
        let asked = Duration::from_millis(u64::from(hint_ms));
        let next = asked.clamp(self.own, MAX_INTERVAL.max(self.own));
        (next != self.interval).then(|| {
            self.interval = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_hint_stretches_the_interval_and_the_ack_timeout_within_bounds() {
        let mut c = Cadence::new(S, 3 * S);
        assert_eq!(c.hinted(0), None, "no hint: the agent's own rhythm");
        assert_eq!(c.hinted(500), None, "never faster than its own");
        assert_eq!(c.hinted(5000), Some(5 * S));
        assert!(c.stretched());
        assert_eq!(c.ack_timeout(), 15 * S, "the same three missed beats");
        assert_eq!(c.hinted(5000), None, "unchanged: nothing to reset");
        assert_eq!(
            c.hinted(u32::MAX),
            Some(MAX_INTERVAL),
            "a hostile hint is capped"
        );
        assert_eq!(c.hinted(0), Some(S), "back to its own");
        assert!(!c.stretched());
        assert_eq!(c.ack_timeout(), 3 * S);
    }

    #[test]
    fn an_agent_slower_than_the_cap_keeps_its_own_interval() {
        let mut c = Cadence::new(45 * S, 135 * S);
        assert_eq!(c.hinted(10_000), None);
        assert_eq!(c.interval(), 45 * S);
    }
}
