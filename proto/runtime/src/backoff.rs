//! Jittered exponential backoff for every retry loop (etcd, sessions).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with "full jitter": each delay is uniform in
/// `[base/2, base]`, and `base` doubles up to `max` until [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait before retrying.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        half + half.mul_f64(random_unit())
    }

    /// The next delay when the server said when to come back (`hint`, see
    /// `steward_proto::retry`): at least the hint, plus up to half of it
    /// again at random, so the clients told the same time do not all come
    /// back at once; the backoff's own delay when that is longer or there
    /// is no hint.
    pub fn next_delay_hinted(&mut self, hint: Option<Duration>) -> Duration {
        let own = self.next_delay();
        match hint {
            Some(hint) => own.max(hint + (hint / 2).mul_f64(random_unit())),
            None => own,
        }
    }

    /// Call after a success: the next failure starts from the initial delay.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A random number in `[0, 1)`, from the standard library's per-process
/// random hash keys (enough for jitter; not for anything secret).
pub fn random_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_is_honoured_with_jitter_above_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let hint = Duration::from_secs(4);
        let delays: Vec<_> = (0..50).map(|_| b.next_delay_hinted(Some(hint))).collect();
        assert!(
            delays.iter().all(|d| *d >= hint && *d <= hint * 3 / 2),
            "{delays:?}"
        );
        assert!(
            delays.iter().any(|d| *d != delays[0]),
            "no jitter: {delays:?}"
        );
        // A hint shorter than the backoff's own delay does not shorten it.
        assert!(b.next_delay_hinted(Some(Duration::from_millis(1))) >= Duration::from_millis(400));
    }

    #[test]
    fn delays_grow_within_jitter_bounds_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let expected_bases = [100, 200, 400, 800, 800];
        for base in expected_bases {
            let d = b.next_delay();
            let base = Duration::from_millis(base);
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
