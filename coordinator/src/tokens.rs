//! Join tokens: what `stewardctl token create` makes and
//! `BootstrapService.Join` checks. A token is `<id>.<secret>` (6 and 16
//! lowercase letters or digits, like kubeadm's); etcd keeps the id, the
//! secret's SHA-256 and the rules (expiry, uses left, the one node it may be
//! for), never the secret. Checking is pure ([`check`]); using a token is a
//! compare-and-set on its record ([`crate::store::Store::consume_token`]), so
//! a single-use token admits exactly one node even when two replicas are
//! asked at once.

use std::fmt;

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use steward_proto::domain::NodeId;

const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Shortest and longest token lifetimes `token create` accepts.
pub const MIN_TTL_S: u64 = 60;
pub const MAX_TTL_S: u64 = 30 * 24 * 3600;
/// How long etcd keeps a record after the token expired, so that using it
/// late says "expired" rather than "unknown".
pub const KEEP_AFTER_EXPIRY_S: u64 = 24 * 3600;

/// A token as the operator holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

/// The secret never reaches a log through `{:?}`.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.****)", self.id)
    }
}

fn well_formed(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl std::str::FromStr for Token {
    type Err = Refusal;
    fn from_str(s: &str) -> Result<Self, Refusal> {
        match s.split_once('.') {
            Some((id, secret)) if well_formed(id, ID_LEN) && well_formed(secret, SECRET_LEN) => {
                Ok(Token {
                    id: id.to_owned(),
                    secret: secret.to_owned(),
                })
            }
            _ => Err(Refusal::Malformed),
        }
    }
}

impl Token {
    pub fn generate() -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pick = |len: usize| -> Result<String, String> {
            let mut bytes = vec![0u8; len];
            rng.fill(&mut bytes)
                .map_err(|_| "no randomness available".to_owned())?;
            // 252 = 7 * 36: reject above it so every character is equally likely.
            let mut out = String::with_capacity(len);
            let mut buf = [0u8; 1];
            for b in bytes {
                let mut b = b;
                while b >= 252 {
                    rng.fill(&mut buf)
                        .map_err(|_| "no randomness available".to_owned())?;
                    b = buf[0];
                }
                out.push(char::from(ALPHABET[usize::from(b % 36)]));
            }
            Ok(out)
        };
        Ok(Token {
            id: pick(ID_LEN)?,
            secret: pick(SECRET_LEN)?,
        })
    }

    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

fn hash_secret(secret: &str) -> String {
    crate::orchestrate::secrets::hex(digest(&SHA256, secret.as_bytes()).as_ref())
}

/// One use of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub node: NodeId,
    pub at_unix_ms: u64,
}

/// `tokens/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Nodes that may join with it; 0: any number until it expires.
    pub uses: u32,
    #[serde(default)]
    pub used_by: Vec<TokenUse>,
    /// The only node that may join with it.
    #[serde(default)]
    pub node: Option<NodeId>,
    #[serde(default)]
    pub description: String,
    /// The admin that made it.
    pub created_by: String,
}

/// Why a join was refused. The messages go to the joining node as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the token is malformed: expected <6 letters or digits>.<16 letters or digits>, as `stewardctl token create` prints it"
    )]
    Malformed,
    /// Also a wrong secret: a guesser learns nothing.
    #[error("unknown or wrong token (deleted, mistyped, or expired more than a day ago); create a new one with `stewardctl token create`")]
    Unknown,
    #[error("the token expired at {at}; create a new one with `stewardctl token create`")]
    Expired { at: String },
    #[error("the token was already used (by {by}); tokens are single-use unless created with --uses N or --reusable")]
    UsedUp { by: String },
    #[error("this token is only for node {bound}, not {node}")]
    WrongNode { bound: NodeId, node: NodeId },
    #[error("node {node} is already known to the cluster; to join it again (a reinstalled host), create a token for it: stewardctl token create --node {node}")]
    NodeExists { node: NodeId },
}

/// May `node` join with `token` under `record` at `now_ms`? `node_known`:
/// the cluster already has records for it (a token not made for that node
/// must not let anyone take over an existing node's identity).
pub fn check(
    record: &TokenRecord,
    token: &Token,
    node: &NodeId,
    node_known: bool,
    now_ms: u64,
) -> Result<(), Refusal> {
    let presented = token.secret_hash();
    // Compared in constant time, though an attacker controls no byte of a
    // hash anyway.
    let differs = presented.len() != record.secret_sha256.len()
        || presented
            .bytes()
            .zip(record.secret_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0;
    if record.id != token.id || differs {
        return Err(Refusal::Unknown);
    }
    if now_ms >= record.expires_unix_ms {
        return Err(Refusal::Expired {
            at: steward_runtime::format_unix_ms(record.expires_unix_ms),
        });
    }
    if record.uses != 0 && record.used_by.len() >= record.uses as usize {
        let by: Vec<&str> = record.used_by.iter().map(|u| u.node.as_str()).collect();
        return Err(Refusal::UsedUp { by: by.join(", ") });
    }
    match &record.node {
        Some(bound) if bound != node => Err(Refusal::WrongNode {
            bound: bound.clone(),
            node: node.clone(),
        }),
        Some(_) => Ok(()),
        None if node_known => Err(Refusal::NodeExists { node: node.clone() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn record(token: &Token) -> TokenRecord {
        TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            created_unix_ms: 1_000,
            expires_unix_ms: 10_000,
            uses: 1,
            used_by: vec![],
            node: None,
            description: String::new(),
            created_by: "ops".into(),
        }
    }

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        let parsed: Token = a.to_string().parse().unwrap();
        assert_eq!(parsed, a);
        assert!(!format!("{a:?}").contains(&a.secret));
        for bad in [
            "",
            "abc",
            "abcdef.short",
            "ABCDEF.0123456789abcdef",
            "abcdef-0123456789abcdef",
        ] {
            assert_eq!(bad.parse::<Token>(), Err(Refusal::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_token_admits_what_its_record_allows() {
        let t = Token::generate().unwrap();
        let r = record(&t);
        assert_eq!(check(&r, &t, &node("n1"), false, 5_000), Ok(()));

        let wrong = Token {
            id: t.id.clone(),
            secret: "0000000000000000".into(),
        };
        assert_eq!(
            check(&r, &wrong, &node("n1"), false, 5_000),
            Err(Refusal::Unknown)
        );
        assert!(matches!(
            check(&r, &t, &node("n1"), false, 10_000),
            Err(Refusal::Expired { .. })
        ));
        assert_eq!(
            check(&r, &t, &node("n1"), true, 5_000),
            Err(Refusal::NodeExists { node: node("n1") })
        );

        let mut used = r.clone();
        used.used_by.push(TokenUse {
            node: node("n1"),
            at_unix_ms: 2_000,
        });
        assert_eq!(
            check(&used, &t, &node("n2"), false, 5_000),
            Err(Refusal::UsedUp { by: "n1".into() })
        );
        used.uses = 0;
        assert_eq!(check(&used, &t, &node("n2"), false, 5_000), Ok(()));

        let mut bound = r;
        bound.node = Some(node("n1"));
        assert_eq!(check(&bound, &t, &node("n1"), true, 5_000), Ok(()));
        assert!(matches!(
            check(&bound, &t, &node("n2"), false, 5_000),
            Err(Refusal::WrongNode { .. })
        ));
    }
}
