//! `steward-agent join`: a new node's first contact. It trusts the
//! coordinator only through the CA hash in its join command, makes its own
//! key (which never leaves the host), sends a CSR with the token, and writes
//! what it gets back: the CA, its certificate, and its config (the values
//! join knows set in place, the rest of an existing config kept, comments
//! included). Then it starts the agent's systemd unit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use steward_proto::domain::NodeId;
use steward_proto::pb;
use steward_proto::pb::bootstrap_service_client::BootstrapServiceClient;
use steward_proto::pki::CaHash;

use crate::certs::{csr_pem, write_atomic};

/// What `steward-agent join` was told.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub token: String,
    /// Bootstrap URLs (`https://host:port`), tried in order.
    pub coordinators: Vec<String>,
    pub ca_hash: CaHash,
    pub node_id: NodeId,
    /// The agent config to write (or update).
    pub config: PathBuf,
    /// Where ca.crt, node.crt and node.key go.
    pub pki_dir: PathBuf,
    /// Replace an existing certificate.
    pub force: bool,
}

/// What a successful join wrote.
#[derive(Debug)]
pub struct Joined {
    pub node_id: NodeId,
    pub coordinators: Vec<String>,
    pub not_after_unix_ms: u64,
    pub cert: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Usage(String),
    #[error("this host already has an agent certificate ({0}); `--force` replaces it")]
    AlreadyJoined(PathBuf),
    /// The coordinator said no; its message says why.
    #[error("{url} refused the join: {message}")]
    Refused { url: String, message: String },
    #[error("no coordinator could be reached: {0}")]
    Unreachable(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JoinError + 'a {
    move |source| JoinError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The files join writes in `pki_dir`.
pub fn pki_paths(pki_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        pki_dir.join("ca.crt"),
        pki_dir.join("node.crt"),
        pki_dir.join("node.key"),
    )
}

/// Asks one replica after another; a refusal is final (another replica
/// would say the same), an unreachable replica is skipped.
async fn ask(
    options: &JoinOptions,
    csr_pem: &str,
) -> Result<(String, pb::JoinResponse), JoinError> {
    let mut unreachable = Vec::new();
    for url in &options.coordinators {
        let channel = match steward_runtime::dial_pinned(
            url,
            options.ca_hash,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                unreachable.push(format!("{url}: {e}"));
                continue;
            }
        };
        let request = pb::JoinRequest {
            token: options.token.clone(),
            node_id: options.node_id.to_string(),
            csr_pem: csr_pem.to_owned(),
        };
        match BootstrapServiceClient::new(channel).join(request).await {
            Ok(response) => return Ok((url.clone(), response.into_inner())),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                unreachable.push(format!("{url}: {}", status.message()));
            }
            Err(status) => {
                return Err(JoinError::Refused {
                    url: url.clone(),
                    message: status.message().to_owned(),
                })
            }
        }
    }
    Err(JoinError::Unreachable(unreachable.join("; ")))
}

/// Joins the cluster: key, CSR, certificate, config. Starts nothing.
pub async fn join(options: &JoinOptions) -> Result<Joined, JoinError> {
    if options.coordinators.is_empty() {
        return Err(JoinError::Usage(
            "give at least one --coordinator (the join command from `stewardctl token create` has them)".into(),
        ));
    }
    let (ca_path, cert_path, key_path) = pki_paths(&options.pki_dir);
    if !options.force && (cert_path.exists() || key_path.exists()) {
        return Err(JoinError::AlreadyJoined(cert_path));
    }
    let key = rcgen::KeyPair::generate()
        .map_err(|e| JoinError::Invalid(format!("cannot make a key: {e}")))?;
    let csr = csr_pem(options.node_id.as_str(), &key).map_err(JoinError::Invalid)?;
    let (url, response) = ask(options, &csr).await?;

    let issued = response
        .certificate
        .ok_or_else(|| JoinError::Invalid(format!("{url} sent no certificate")))?;
    // The TLS handshake already proved the chain; the CA we store must be
    // the one we pinned, too.
    let ca_hash = CaHash::of_pem(&issued.ca_pem)
        .map_err(|e| JoinError::Invalid(format!("{url} sent an unreadable CA: {e}")))?;
    if ca_hash != options.ca_hash {
        return Err(JoinError::Invalid(format!(
            "{url} sent a CA with hash {ca_hash}, not the pinned {}",
            options.ca_hash
        )));
    }
    if response.coordinators.is_empty() {
        return Err(JoinError::Invalid(format!(
            "{url} named no coordinator replicas"
        )));
    }

    std::fs::create_dir_all(&options.pki_dir).map_err(io("create", &options.pki_dir))?;
    // Key first: a certificate on disk always has its key next to it.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io("write", &key_path))?;
    write_atomic(&cert_path, issued.certificate_pem.as_bytes(), 0o644)
        .map_err(io("write", &cert_path))?;
    write_atomic(&ca_path, issued.ca_pem.as_bytes(), 0o644).map_err(io("write", &ca_path))?;

    let existing = match std::fs::read_to_string(&options.config) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("read", &options.config)(e)),
    };
    let edits = config_edits(
        &options.node_id,
        &response.coordinators,
        (&ca_path, &cert_path, &key_path),
    );
    let text = match &existing {
        Some(text) => edit_config(text, &edits),
        None => new_config(&edits),
    };
    check_edited(&text, &edits).map_err(|problem| {
        JoinError::Invalid(format!(
            "{}: cannot set the joined values in this config ({problem}); fix or remove it and join again with --force",
            options.config.display()
        ))
    })?;
    if let Some(dir) = options.config.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    write_atomic(&options.config, text.as_bytes(), 0o644).map_err(io("write", &options.config))?;
    Ok(Joined {
        node_id: options.node_id.clone(),
        coordinators: response.coordinators,
        not_after_unix_ms: issued.not_after_unix_ms,
        cert: cert_path,
    })
}

/// One `key = value` join sets, in `section` (`None`: the top level).
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    pub section: Option<&'static str>,
    pub key: &'static str,
    pub value: toml::Value,
}

impl Edit {
    fn line(&self) -> String {
        format!("{} = {}", self.key, self.value)
    }
}

fn config_edits(node: &NodeId, coordinators: &[String], tls: (&Path, &Path, &Path)) -> Vec<Edit> {
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    vec![
        Edit {
            section: None,
            key: "node_id",
            value: toml::Value::String(node.to_string()),
        },
        Edit {
            section: None,
            key: "coordinators",
            value: toml::Value::Array(
                coordinators
                    .iter()
                    .map(|c| toml::Value::String(c.clone()))
                    .collect(),
            ),
        },
        Edit {
            section: Some("tls"),
            key: "ca",
            value: path(tls.0),
        },
        Edit {
            section: Some("tls"),
            key: "cert",
            value: path(tls.1),
        },
        Edit {
            section: Some("tls"),
            key: "key",
            value: path(tls.2),
        },
    ]
}

fn new_config(edits: &[Edit]) -> String {
    let mut text = String::from(
        "# steward-agent configuration, written by `steward-agent join`.\n\
         # Every other setting is documented in the packaged agent.toml example.\n\n",
    );
    let mut section = None;
    for e in edits {
        if e.section != section {
            if let Some(s) = e.section {
                text.push_str(&format!("\n[{s}]\n"));
            }
            section = e.section;
        }
        text.push_str(&e.line());
        text.push('\n');
    }
    text
}

/// Sets each edit's key in place, or adds it (and its table) where TOML
/// puts it; everything else — comments, order, formatting — stays as it
/// was (`toml_edit`). A text that is not TOML comes back unchanged, and
/// [`check_edited`] refuses it.
pub fn edit_config(text: &str, edits: &[Edit]) -> String {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return text.to_owned();
    };
    for e in edits {
        // `toml::Value` prints as TOML, which `toml_edit` reads back.
        let Ok(value) = e.value.to_string().parse::<toml_edit::Value>() else {
            continue;
        };
        let item = match e.section {
            None => &mut doc[e.key],
            Some(section) => &mut doc[section][e.key],
        };
        *item = toml_edit::value(value);
    }
    doc.to_string()
}

/// The edited text must be TOML and carry exactly the joined values.
fn check_edited(text: &str, edits: &[Edit]) -> Result<(), String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    for e in edits {
        let scope = match e.section {
            None => Some(&table),
            Some(s) => table.get(s).and_then(|v| v.as_table()),
        };
        if scope.and_then(|t| t.get(e.key)) != Some(&e.value) {
            return Err(format!(
                "{}{} did not take the new value",
                e.section.map(|s| format!("{s}.")).unwrap_or_default(),
                e.key
            ));
        }
    }
    Ok(())
}

/// Starts (or restarts) the agent's unit when systemd runs this host.
/// `Ok(false)`: no systemd, nothing started.
pub fn start_unit(unit: &str) -> Result<bool, String> {
    if !Path::new("/run/systemd/system").exists() {
        return Ok(false);
    }
    for args in [["enable", unit], ["restart", unit]] {
        let out = std::process::Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| format!("systemctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "systemctl {} {unit}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits() -> Vec<Edit> {
        config_edits(
            &NodeId::new("web-3").unwrap(),
            &["https://c1:7443".into(), "https://c2:7443".into()],
            (
                Path::new("/etc/steward/pki/ca.crt"),
                Path::new("/etc/steward/pki/node.crt"),
                Path::new("/etc/steward/pki/node.key"),
            ),
        )
    }

    #[test]
    fn the_packaged_example_takes_the_joined_values_and_keeps_the_rest() {
        let example = include_str!("../../packaging/agent.example.toml");
        let edited = edit_config(example, &edits());
        check_edited(&edited, &edits()).unwrap();
        // Comments and other settings survive.
        assert!(edited.contains("# Converging the host onto its roles"));
        assert!(edited.contains("recheck_interval_s = 60"));
        let table: toml::Table = toml::from_str(&edited).unwrap();
        assert_eq!(table["vip"]["profile"].as_str(), Some("default"));
        // Editing again changes nothing.
        assert_eq!(edit_config(&edited, &edits()), edited);
    }

    #[test]
    fn multi_line_values_missing_keys_and_sections_are_handled() {
        let text = "# mine\ncoordinators = [\n  \"https://old:7443\",\n]\nheartbeat_interval_ms = 500\n\n[converge]\nenabled = false\n";
        let edited = edit_config(text, &edits());
        check_edited(&edited, &edits()).unwrap();
        assert!(!edited.contains("old"));
        let table: toml::Table = toml::from_str(&edited).unwrap();
        assert_eq!(table["heartbeat_interval_ms"].as_integer(), Some(500));
        assert_eq!(table["converge"]["enabled"].as_bool(), Some(false));
        // A fresh config is the same values.
        check_edited(&new_config(&edits()), &edits()).unwrap();
    }

    #[test]
    fn a_config_that_is_not_toml_is_refused() {
        let text = "tls = { ca = \"x\", cert = \"y\"\n";
        assert_eq!(edit_config(text, &edits()), text);
        assert!(check_edited(&edit_config(text, &edits()), &edits()).is_err());
    }

    #[test]
    fn inline_tables_take_the_values_too() {
        let text = "tls = { ca = \"x\", cert = \"y\", key = \"z\" }\n";
        let edited = edit_config(text, &edits());
        check_edited(&edited, &edits()).unwrap();
    }

    #[test]
    fn hashes_and_brackets_inside_strings_are_values() {
        let text = concat!(
            "# mine\n",
            "motd = \"a # is no comment, [this] no table\"\n",
            "coordinators = [\"https://a#b:7443\", \"https://[::1]:7443\"] # old\n",
            "heartbeat_interval_ms = 500 # [ms]\n",
            "\n",
            "[tls]\n",
            "ca = \"/etc/a#b/[c].crt\"\n",
            "\n",
            "[converge] # not [tls]\n",
            "enabled = false\n",
        );
        let edited = edit_config(text, &edits());
        check_edited(&edited, &edits()).unwrap();
        let table: toml::Table = toml::from_str(&edited).unwrap();
        assert_eq!(
            table["motd"].as_str(),
            Some("a # is no comment, [this] no table")
        );
        assert_eq!(table["heartbeat_interval_ms"].as_integer(), Some(500));
        assert_eq!(table["converge"]["enabled"].as_bool(), Some(false));
        assert!(!edited.contains("https://a#b:7443"), "{edited}");
        for kept in ["# mine\n", "# [ms]\n", "[converge] # not [tls]\n"] {
            assert!(edited.contains(kept), "{kept:?} lost:\n{edited}");
        }
        assert_eq!(edit_config(&edited, &edits()), edited);
    }
}
