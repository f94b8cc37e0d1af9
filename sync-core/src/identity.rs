//! This device's key pair. Made on first use and kept in the device's own database; the
//! private key never leaves it. The device id and the key fingerprint derive from the
//! public key, so a peer that proves it holds the key proves which device it is.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PKCS_ED25519, PublicKeyData, SigningKey};

use crate::DeviceId;

/// A device's Ed25519 key pair.
pub struct DeviceKey {
    key: KeyPair,
}

/// Why a key could not be made or read.
#[derive(Debug, thiserror::Error)]
#[error("device key: {0}")]
pub struct KeyError(String);

impl DeviceKey {
    /// A fresh key pair.
    pub fn generate() -> Result<DeviceKey, KeyError> {
        KeyPair::generate_for(&PKCS_ED25519)
            .map(|key| DeviceKey { key })
            .map_err(|e| KeyError(e.to_string()))
    }

    /// A key pair stored by `to_pem`.
    pub fn from_pem(pem: &str) -> Result<DeviceKey, KeyError> {
        KeyPair::from_pem(pem)
            .map(|key| DeviceKey { key })
            .map_err(|e| KeyError(e.to_string()))
    }

    /// The key pair in PKCS#8 PEM, private key included: for this device's database only.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The private key in PKCS#8 DER, for this device's TLS configuration.
    pub fn private_key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// The public key's fingerprint.
    pub fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint::of_public_key(&self.public_key_der())
    }

    /// The device id this key stands for.
    pub fn device_id(&self) -> DeviceId {
        self.fingerprint().device_id()
    }

    /// Signs `message` with the private key (Ed25519): for what other devices must be able
    /// to trust without a connection to this one, such as a move record.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.key.sign(message).map_err(|e| KeyError(e.to_string()))
    }

    /// A self-signed certificate for the key, in DER, to present in TLS. Peers check the
    /// key inside it against a fingerprint or a member list, never a certificate authority.
    pub fn self_signed_certificate(&self) -> Result<Vec<u8>, KeyError> {
        let params = rcgen::CertificateParams::new(vec!["seaorm-sync".to_owned()])
            .map_err(|e| KeyError(e.to_string()))?;
        params
            .self_signed(&self.key)
            .map(|cert| cert.der().to_vec())
            .map_err(|e| KeyError(e.to_string()))
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.debug_struct("DeviceKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The BLAKE3 hash of a public key (its DER SubjectPublicKeyInfo). Followers pin the
/// leader's; shown as 64 hex digits.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_public_key(spki_der: &[u8]) -> KeyFingerprint {
        KeyFingerprint(*blake3::hash(spki_der).as_bytes())
    }

    /// The device id of the key: the fingerprint's first 16 bytes as a UUID (version 8).
    pub fn device_id(&self) -> DeviceId {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&self.0[..16]);
        DeviceId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyFingerprint({self})")
    }
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Whether `signature` is the Ed25519 signature of `message` by the key whose DER
/// SubjectPublicKeyInfo is `spki_der` (what [`DeviceKey::public_key_der`] gives). False for
/// anything that is not an Ed25519 key.
pub fn verify_signature(spki_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Some(raw) = spki_der.strip_prefix(&ED25519_SPKI_PREFIX[..]) else {
        return false;
    };
    if raw.len() != ring::signature::ED25519_PUBLIC_KEY_LEN {
        return false;
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw)
        .verify(message, signature)
        .is_ok()
}

/// Why a fingerprint did not parse.
#[derive(Debug, thiserror::Error)]
#[error("a key fingerprint is 64 hex digits")]
pub struct BadFingerprint;

impl FromStr for KeyFingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(KeyFingerprint(out))
    }
}

/// This device's key pair, made on first use and kept in `sync_local`. Processes that
/// share a database are one device with one key, however many make it at once.
pub(crate) async fn ensure_device_key(
    db: &sea_orm::DatabaseConnection,
) -> Result<DeviceKey, crate::OpenError> {
    use sea_orm::EntityTrait;
    if let Some(pem) = crate::library::get_local(db, crate::library::LOCAL_DEVICE_KEY).await? {
        return DeviceKey::from_pem(&pem).map_err(|e| crate::OpenError::Corrupt(e.to_string()));
    }
    let key = DeviceKey::generate().map_err(|e| crate::OpenError::Corrupt(e.to_string()))?;
    // Several processes making the key at once (server processes sharing one PostgreSQL
    // database are one device): the first one stored wins, and every process reads that
    // one back. Insert-if-absent as a statement of its own, then a fresh read: a read and
    // an upsert in one transaction let a later process overwrite the key an earlier one
    // had already committed and used (PostgreSQL's read committed), or miss it (MySQL's
    // snapshot).
    // (A plain insert: it fails on the key another process stored first, and that one is
    // read back; `ON CONFLICT DO NOTHING` has no form MariaDB accepts.)
    let stored = crate::tables::local::Entity::insert(crate::tables::local::ActiveModel {
        key: sea_orm::ActiveValue::Set(crate::library::LOCAL_DEVICE_KEY.to_owned()),
        value: sea_orm::ActiveValue::Set(key.to_pem()),
    })
    .exec_without_returning(db)
    .await;
    match crate::library::get_local(db, crate::library::LOCAL_DEVICE_KEY).await? {
        Some(pem) => {
            DeviceKey::from_pem(&pem).map_err(|e| crate::OpenError::Corrupt(e.to_string()))
        }
        None => Err(match stored {
            Err(e) => e.into(),
            Ok(_) => crate::OpenError::Corrupt("the device key vanished as it was stored".into()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_key_is_the_same_device() {
        let key = DeviceKey::generate().unwrap();
        let again = DeviceKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(key.device_id(), again.device_id());
        assert_eq!(key.fingerprint(), again.fingerprint());
        assert_ne!(key.device_id(), DeviceKey::generate().unwrap().device_id());
        assert_eq!(key.device_id().0.get_version_num(), 8);
    }

    #[test]
    fn a_signature_verifies_with_its_key_only() {
        let key = DeviceKey::generate().unwrap();
        let other = DeviceKey::generate().unwrap();
        let signature = key.sign(b"move").unwrap();
        assert!(verify_signature(&key.public_key_der(), b"move", &signature));
        assert!(!verify_signature(
            &key.public_key_der(),
            b"moved",
            &signature
        ));
        assert!(!verify_signature(
            &other.public_key_der(),
            b"move",
            &signature
        ));
        assert!(!verify_signature(b"not a key", b"move", &signature));
    }

    #[test]
    fn fingerprints_round_trip_through_text() {
        let fingerprint = DeviceKey::generate().unwrap().fingerprint();
        assert_eq!(
            fingerprint.to_string().parse::<KeyFingerprint>().unwrap(),
            fingerprint
        );
        assert!("abc".parse::<KeyFingerprint>().is_err());
        assert!("zz".repeat(32).parse::<KeyFingerprint>().is_err());
    }
}
