//! TLS 1.3 with device keys: both sides present a self-signed certificate of their device
//! key. Nobody is trusted for a certificate authority's signature:
//!
//! - a follower pins the leader's key fingerprint (from the invite) and refuses any other
//!   key, whatever its certificate says;
//! - the leader accepts any key that proves possession in the handshake, and then decides
//!   membership itself, so that a refused device is told why in a message ("not a member",
//!   "revoked") rather than losing its connection to a bare TLS alert.

use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use sync_core::{DeviceKey, KeyFingerprint};

use crate::TransportError;

/// The ALPN protocol id; the sync protocol's version is settled in the first message.
pub(crate) const ALPN: &[u8] = b"seaorm-sync";

/// The name the client asks for: certificates are checked by key, not by name.
pub(crate) const SERVER_NAME: &str = "seaorm-sync";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(
    key: &DeviceKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
    let cert = key
        .self_signed_certificate()
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.private_key_der()));
    Ok((vec![CertificateDer::from(cert)], private))
}

/// The fingerprint of the key in a certificate.
pub(crate) fn fingerprint_of(cert: &CertificateDer<'_>) -> Result<KeyFingerprint, rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    Ok(KeyFingerprint::of_public_key(
        parsed.subject_public_key_info().as_ref(),
    ))
}

/// The leader's TLS configuration.
pub(crate) fn server_config(key: &DeviceKey) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(AnyDeviceKey {
        algorithms: provider.signature_verification_algorithms,
    });
    let (chain, private) = certified(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A follower's TLS configuration, pinned to `leader`. `seen` receives the key the server
/// presented, so that a mismatch can be reported with both fingerprints.
pub(crate) fn client_config(
    key: &DeviceKey,
    leader: KeyFingerprint,
    seen: Arc<Mutex<Option<KeyFingerprint>>>,
) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedKey {
        pin: leader,
        seen,
        algorithms: provider.signature_verification_algorithms,
    });
    let (chain, private) = certified(key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, private)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Accepts the server only if its key has the pinned fingerprint.
#[derive(Debug)]
struct PinnedKey {
    pin: KeyFingerprint,
    seen: Arc<Mutex<Option<KeyFingerprint>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = fingerprint_of(end_entity)?;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
        if found == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "leader key {found} is not the pinned key {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Requires a client certificate and proof of its key; membership is decided after the
/// handshake.
#[derive(Debug)]
struct AnyDeviceKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyDeviceKey {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        fingerprint_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The fingerprint of the key a connected peer proved it holds.
pub(crate) fn peer_fingerprint(connection: &quinn::Connection) -> Option<KeyFingerprint> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    fingerprint_of(chain.first()?).ok()
}

/// TLS 1.2 is never offered (both configurations are TLS 1.3 only): a peer asking for it
/// is refused by either verifier.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}
