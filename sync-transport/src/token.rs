//! Join tokens: what a leader hands a new device, out of band (a chat message, a QR code).
//!
//! `syncjoin1.<base64url of the JSON terms>.<base64url of an 8-byte BLAKE3 check>`
//!
//! The check catches a token damaged in transit or edited by hand. It is no seal: the
//! leader decides, from its own record of the invite, what a redeemed token grants, and
//! refuses a token whose terms differ from what it issued.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sync_core::{Access, Invite, KeyFingerprint, LibraryId};

const PREFIX: &str = "syncjoin1.";

/// The terms of an invite, as a joining device reads them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Where the leader listens (`host:port`): the first of `addresses` (what builds that
    /// know one address only read).
    pub address: String,
    /// Every address the leader serves on (`host:port`), when it serves from several
    /// processes (several `Server`s on one PostgreSQL database), in the order to try
    /// them; empty in tokens of one address and in tokens made by earlier builds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The leader's key fingerprint (64 hex digits), pinned by the follower.
    pub leader_key: String,
    /// The library.
    pub library_id: LibraryId,
    /// The access the invite grants.
    pub access: Access,
    /// The one-time secret, hex.
    pub secret: String,
    /// When the invite expires (ms since the epoch).
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("JoinToken")
            .field("addresses", &self.addresses())
            .field("leader_key", &self.leader_key)
            .field("library_id", &self.library_id)
            .field("access", &self.access)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why a token could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token at all.
    #[error(
        "this is not a join token (it should start with `{PREFIX}`); copy the whole token the leader made (`JoinToken::encode`)"
    )]
    NotAToken,
    /// Damaged or edited.
    #[error(
        "this join token is damaged or was altered ({0}); copy it again, or ask the leader for a new one"
    )]
    Damaged(&'static str),
    /// Past its expiry.
    #[error("this join token expired at {0}; ask the leader for a new one")]
    Expired(String),
}

impl JoinToken {
    /// The token for `invite`, issued by the leader with key `leader_key` at `address`.
    pub fn new(invite: &Invite, address: &str, leader_key: KeyFingerprint) -> JoinToken {
        JoinToken::for_addresses(invite, &[address.to_owned()], leader_key)
    }

    /// The token for `invite`, issued by the leader with key `leader_key`, which serves at
    /// every one of `addresses` (tried in this order; at least one).
    pub fn for_addresses(
        invite: &Invite,
        addresses: &[String],
        leader_key: KeyFingerprint,
    ) -> JoinToken {
        JoinToken {
            address: addresses.first().cloned().unwrap_or_default(),
            addresses: if addresses.len() > 1 {
                addresses.to_vec()
            } else {
                Vec::new()
            },
            leader_key: leader_key.to_string(),
            library_id: invite.library_id,
            access: invite.access,
            secret: hex(&invite.secret),
            expires_at_ms: invite.expires_at_ms,
        }
    }

    /// The token as text.
    pub fn encode(&self) -> String {
        // A struct of strings and numbers always serialises.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = blake3::hash(&json);
        let check = &hash.as_bytes()[..8];
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(check)
        )
    }

    /// Reads a token, refusing a damaged or expired one.
    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let rest = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError::NotAToken)?;
        let (terms, check) = rest
            .split_once('.')
            .ok_or(TokenError::Damaged("no check"))?;
        let json = URL_SAFE_NO_PAD
            .decode(terms)
            .map_err(|_| TokenError::Damaged("terms are not base64"))?;
        let check = URL_SAFE_NO_PAD
            .decode(check)
            .map_err(|_| TokenError::Damaged("check is not base64"))?;
        if check[..] != blake3::hash(&json).as_bytes()[..8] {
            return Err(TokenError::Damaged("check does not match"));
        }
        let token: JoinToken =
            serde_json::from_slice(&json).map_err(|_| TokenError::Damaged("terms unreadable"))?;
        token.fingerprint()?;
        token.secret_bytes()?;
        if token.addresses().iter().any(String::is_empty) {
            return Err(TokenError::Damaged("no address"));
        }
        if token.expires_at_ms <= chrono::Utc::now().timestamp_millis() {
            return Err(TokenError::Expired(
                chrono::DateTime::from_timestamp_millis(token.expires_at_ms)
                    .map_or_else(|| token.expires_at_ms.to_string(), |t| t.to_rfc3339()),
            ));
        }
        Ok(token)
    }

    /// Every address the leader serves on, in the order to try them.
    pub fn addresses(&self) -> Vec<String> {
        if self.addresses.is_empty() {
            vec![self.address.clone()]
        } else {
            self.addresses.clone()
        }
    }

    /// The pinned leader key.
    pub fn fingerprint(&self) -> Result<KeyFingerprint, TokenError> {
        self.leader_key
            .parse()
            .map_err(|_| TokenError::Damaged("leader key"))
    }

    /// The secret's bytes.
    pub fn secret_bytes(&self) -> Result<[u8; 32], TokenError> {
        parse_hex32(&self.secret).ok_or(TokenError::Damaged("secret"))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token(expires_in_ms: i64) -> JoinToken {
        JoinToken {
            address: "127.0.0.1:7000".into(),
            addresses: Vec::new(),
            leader_key: "ab".repeat(32),
            library_id: LibraryId::new_random(),
            access: Access::Write,
            secret: "cd".repeat(32),
            expires_at_ms: chrono::Utc::now().timestamp_millis() + expires_in_ms,
        }
    }

    #[test]
    fn a_token_round_trips() {
        let t = token(60_000);
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn a_token_of_several_addresses_round_trips_and_old_tokens_still_decode() {
        let mut t = token(60_000);
        t.addresses = vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()];
        let decoded = JoinToken::decode(&t.encode()).unwrap();
        assert_eq!(decoded, t);
        assert_eq!(decoded.addresses(), ["127.0.0.1:7000", "127.0.0.1:7001"]);
        // A token of one address carries no list: what an earlier build made and reads.
        let one = token(60_000);
        let text = one.encode();
        let (terms, _) = text[PREFIX.len()..].split_once('.').unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(terms).unwrap()).unwrap();
        assert!(!json.contains("addresses"), "{json}");
        // An earlier build's token (no `addresses` field) decodes, with its one address.
        let earlier = serde_json::json!({
            "address": "10.0.0.1:7447",
            "leader_key": "ab".repeat(32),
            "library_id": one.library_id,
            "access": "read",
            "secret": "cd".repeat(32),
            "expires_at_ms": one.expires_at_ms,
        });
        let json = serde_json::to_vec(&earlier).unwrap();
        let hash = blake3::hash(&json);
        let check = &hash.as_bytes()[..8];
        let text = format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(check)
        );
        assert_eq!(
            JoinToken::decode(&text).unwrap().addresses(),
            ["10.0.0.1:7447"]
        );
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let text = token(60_000).encode();
        // Edit the terms: swap `write` for `read` in the JSON and re-encode them, keeping
        // the old check.
        let (terms, check) = text[PREFIX.len()..].split_once('.').unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(terms).unwrap()).unwrap();
        let edited = json.replace("\"write\"", "\"read\"");
        assert_ne!(edited, json);
        let forged = format!("{PREFIX}{}.{check}", URL_SAFE_NO_PAD.encode(edited));
        assert_eq!(
            JoinToken::decode(&forged),
            Err(TokenError::Damaged("check does not match"))
        );
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::NotAToken));
        assert!(matches!(
            JoinToken::decode(&text[..text.len() - 3]),
            Err(TokenError::Damaged(_))
        ));
    }

    #[test]
    fn an_expired_token_is_refused() {
        assert!(matches!(
            JoinToken::decode(&token(-1).encode()),
            Err(TokenError::Expired(_))
        ));
    }
}
