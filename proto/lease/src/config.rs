//! `[vip]` in the agent's and the coordinator's config.

use std::time::Duration;

use serde::Deserialize;

use crate::LeaseParams;

/// `[vip]` in the agent's and the coordinator's config: the lease protocol's
/// timing. Both sides must agree (replicas refuse agents that do not).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// "default" (failover in about 1 s) or "fast" (about 250 ms, for
    /// quiet LANs); the keys below override single values.
    pub profile: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub drift_margin: Option<f64>,
    /// Coordinator replicas in the cluster (quorum = replicas/2 + 1).
    pub replicas: Option<usize>,
}

impl LeaseConfig {
    /// The parameters, or every problem with them (prefixed `vip.`).
    pub fn params(&self, default_replicas: usize) -> Result<LeaseParams, Vec<String>> {
        let base = match self.profile.as_deref() {
            None | Some("default") => LeaseParams::DEFAULT,
            Some("fast") => LeaseParams::FAST,
            Some(other) => {
                return Err(vec![format!(
                    "vip.profile = {other:?}: expected \"default\" or \"fast\""
                )])
            }
        };
        let params = LeaseParams {
            heartbeat: self
                .heartbeat_ms
                .map_or(base.heartbeat, Duration::from_millis),
            lease: self.lease_ms.map_or(base.lease, Duration::from_millis),
            drift_margin: self.drift_margin.unwrap_or(base.drift_margin),
            replicas: self.replicas.unwrap_or(default_replicas),
        };
        let problems: Vec<String> = params
            .problems()
            .into_iter()
            .map(|p| format!("vip: {p}"))
            .collect();
        if problems.is_empty() {
            Ok(params)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_config_profiles_overrides_and_problems() {
        let fast = LeaseConfig {
            profile: Some("fast".into()),
            ..Default::default()
        };
        assert_eq!(fast.params(3).unwrap(), LeaseParams::FAST);
        let custom = LeaseConfig {
            lease_ms: Some(900),
            ..Default::default()
        };
        let p = custom.params(5).unwrap();
        assert_eq!(p.lease, Duration::from_millis(900));
        assert_eq!(p.replicas, 5);
        let bad = LeaseConfig {
            heartbeat_ms: Some(400),
            lease_ms: Some(500),
            ..Default::default()
        };
        let problems = bad.params(3).unwrap_err();
        assert!(
            problems[0].contains("at least 3 heartbeats"),
            "{problems:?}"
        );
        let unknown = LeaseConfig {
            profile: Some("turbo".into()),
            ..Default::default()
        };
        assert!(unknown.params(3).is_err());
    }
}
