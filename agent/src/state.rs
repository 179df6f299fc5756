//! The agent's memory across restarts: the last desired state it received,
//! written atomically (temp file, fsync, rename) so a crash leaves either the
//! old or the new state, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use steward_proto::domain::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What `desired.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedState {
    pub desired: DesiredState,
    /// URL of the coordinator replica that sent it.
    pub from_coordinator: String,
    pub received_unix_ms: u64,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn desired_path(&self) -> PathBuf {
        self.dir.join("desired.json")
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The recorded state; `None` on first start.
    pub fn load(&self) -> Result<Option<RecordedState>, StateError> {
        let path = self.desired_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    pub fn save(&self, state: &RecordedState) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let path = self.desired_path();
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        // The desired state can carry cluster secrets (join tokens, a CA
        // key): readable by root only.
        crate::certs::write_atomic(&path, &bytes, 0o600).map_err(Self::io(&path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use steward_proto::domain::Role;

    #[test]
    fn saves_and_loads_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert_eq!(store.load().unwrap(), None);
        let state = RecordedState {
            desired: DesiredState {
                revision: 5,
                roles: [Role::Lb].into(),
                ..Default::default()
            },
            from_coordinator: "c1".into(),
            received_unix_ms: 1,
        };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
        let mode = std::fs::metadata(store.desired_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the desired state may hold secrets");
        std::fs::write(store.desired_path(), b"{not json").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    }
}
