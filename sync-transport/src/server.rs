//! The leader's side: serves every library this device leads to the devices that are
//! members of it.
//!
//! One task per connection. A connection opens with a control stream whose first frame
//! is `Hello` (a member starting a session) or `Join` (a device redeeming an invite).
//! After `Welcome`, the leader keeps the control stream to announce its latest seq, and
//! answers each request on a stream of its own. Whatever a peer sends, it costs the
//! leader that one connection at most: frames are bounded, every wait has a deadline,
//! and a refusal closes only that connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_core::{
    Access, Admission, CommitWatcher, DeviceId, DeviceKey, KeyFingerprint, LeaderView, Library,
    LibraryId, PROTOCOL_VERSION, PullError,
};
use tokio::task::JoinSet;

use crate::frame::{self, ReadError, Refusal, Request, Response};
use crate::{TransportError, tls};

/// Deadlines and limits of a leader.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// For the TLS handshake and the first frame.
    pub handshake_timeout: Duration,
    /// For a request frame once its stream opened.
    pub request_timeout: Duration,
    /// A connection silent this long is closed (followers send keep-alives).
    pub idle_timeout: Duration,
    /// Requests in flight per connection.
    pub streams_per_connection: u32,
    /// How often a live session rechecks its device's membership, for revocations made
    /// by another process (this process's own revocations apply at once).
    pub membership_recheck: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            streams_per_connection: 16,
            membership_recheck: Duration::from_secs(1),
        }
    }
}

/// A running leader. Dropping it stops accepting; `shutdown` also closes connections.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    _watchers: Vec<CommitWatcher>,
}

struct Shared {
    libraries: HashMap<LibraryId, LeaderView>,
    config: ServerConfig,
    /// When serving began: sessions recheck membership on one grid from here.
    started: tokio::time::Instant,
}

impl Server {
    /// Serves `libraries` (each led by this device, whose key is `key`) on `addr`.
    pub async fn bind(
        addr: SocketAddr,
        key: &DeviceKey,
        libraries: Vec<Library>,
        config: ServerConfig,
    ) -> Result<Server, TransportError> {
        let mut served = HashMap::new();
        for library in libraries {
            // Whatever its role now: a follower's server serves nothing until it leads
            // (each request answered `Moved`), and then serves without a restart.
            served.insert(library.id(), library.server_view());
        }
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                config
                    .idle_timeout
                    .try_into()
                    .map_err(|_| TransportError::Config("idle timeout too long".into()))?,
            ))
            .max_concurrent_bidi_streams(config.streams_per_connection.into())
            .max_concurrent_uni_streams(0u32.into());
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(key)?)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut quic = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        quic.transport_config(Arc::new(transport));
        let mut endpoint_config = quinn::EndpointConfig::default();
        // A restarted leader must recognise the connection ids it issued before (quinn
        // drops packets for ids its generator did not make, without a reset) and sign
        // the same reset tokens for them: both keys derive from the device key.
        let keys = RestartKeys::of(key);
        endpoint_config
            .reset_key(Arc::new(keys.reset))
            .cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(keys.cid))
            });
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Config("no async runtime to serve on".into()))?;
        let endpoint = std::net::UdpSocket::bind(addr)
            .and_then(|socket| quinn::Endpoint::new(endpoint_config, Some(quic), socket, runtime))
            .map_err(|e| TransportError::Config(format!("cannot listen on {addr}: {e}")))?;
        let local_addr = endpoint.local_addr().map_err(TransportError::Io)?;
        let watchers = served
            .values()
            .map(|leader| leader.watch_commits())
            .collect();
        for id in served.keys() {
            // Shown as 0 from the start rather than absent until the first session.
            metrics::gauge!(sync_core::metrics::CONNECTED_FOLLOWERS, "library" => id.to_string())
                .increment(0.0);
        }
        let shared = Arc::new(Shared {
            libraries: served,
            config,
            started: tokio::time::Instant::now(),
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared));
        Ok(Server {
            endpoint,
            local_addr,
            accept,
            _watchers: watchers,
        })
    }

    /// Where it listens (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, tells connected followers the leader is going away, and waits
    /// (briefly) until they have been told.
    pub async fn shutdown(self) {
        self.accept.abort();
        self.endpoint
            .close(0u32.into(), b"the leader is shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The key of the leader's stateless resets, derived from its device key: the same after
/// a restart.
///
/// A leader that dies without closing (SIGKILL, power loss) leaves its followers'
/// connections open. When it comes back, their next packets (keep-alives) are for
/// connections it no longer knows, and it answers each with a stateless reset, a token
/// that only the key the connection began with produces. quinn's default key is random
/// per process, so followers ignored the restarted leader's resets and waited out their
/// idle timeout (about 34 s); with this key they drop the dead connection at once and
/// reconnect (`cli::a_live_follower_resumes_soon_after_its_leader_is_killed_and_restarted`).
struct ResetKey([u8; 32]);

/// The keys a leader's endpoint keeps across restarts: of its stateless resets, and of
/// the connection ids it issues.
struct RestartKeys {
    reset: ResetKey,
    cid: u64,
}

impl RestartKeys {
    fn of(key: &DeviceKey) -> RestartKeys {
        let secret = key.private_key_der();
        let cid = blake3::derive_key("seaorm-sync 2026-12 QUIC connection id key", &secret);
        RestartKeys {
            reset: ResetKey(blake3::derive_key(
                "seaorm-sync 2026-12 QUIC stateless reset key",
                &secret,
            )),
            cid: u64::from_le_bytes([
                cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
            ]),
        }
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let expected = blake3::keyed_hash(&self.0, data);
        // `blake3::Hash`'s comparison takes constant time.
        match <[u8; blake3::OUT_LEN]>::try_from(signature) {
            Ok(given) if expected == blake3::Hash::from(given) => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        // Reap finished connection tasks as we go.
        while connections.try_join_next().is_some() {}
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(shared.config.handshake_timeout, incoming).await {
                Ok(Ok(connection)) => serve_connection(connection, shared).await,
                Ok(Err(e)) => tracing::debug!(%remote, %e, "handshake failed"),
                Err(_) => tracing::debug!(%remote, "handshake timed out"),
            }
        });
    }
}

/// Refuses on `send`, then closes the connection with the same message, so the peer sees
/// the reason whichever it reads first.
async fn refuse(
    connection: &quinn::Connection,
    send: Option<&mut quinn::SendStream>,
    code: Refusal,
    message: String,
) {
    tracing::info!(remote = %connection.remote_address(), ?code, %message, "refused");
    if let Some(send) = send {
        let refused = Response::Refused {
            code,
            message: message.clone(),
            divergence: None,
            epoch: None,
            moved: None,
        };
        if frame::write(send, &refused).await.is_ok() && send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        }
    }
    // QUIC carries a close reason of up to about a packet; long messages are cut.
    let mut reason = message.into_bytes();
    reason.truncate(1_000);
    connection.close(code.close_code().into(), &reason);
}

async fn serve_connection(connection: quinn::Connection, shared: Arc<Shared>) {
    let Some(fingerprint) = tls::peer_fingerprint(&connection) else {
        refuse(
            &connection,
            None,
            Refusal::BadRequest,
            "no device key presented".into(),
        )
        .await;
        return;
    };
    let device = fingerprint.device_id();
    let timeout = shared.config.handshake_timeout;
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(timeout, connection.accept_bi()).await
    else {
        connection.close(
            Refusal::BadRequest.close_code().into(),
            b"no request in time",
        );
        return;
    };
    let first = match tokio::time::timeout(timeout, frame::read_bytes(&mut recv)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            refuse(
                &connection,
                Some(&mut send),
                Refusal::BadRequest,
                e.to_string(),
            )
            .await;
            return;
        }
        Err(_) => {
            refuse(
                &connection,
                Some(&mut send),
                Refusal::BadRequest,
                "no request in time".into(),
            )
            .await;
            return;
        }
    };
    let request = match frame::decode::<Request>(&first) {
        Ok(request) => request,
        Err(e) => {
            let (code, message) = match frame::stated_protocol_version(&first) {
                Some(theirs) if theirs != u64::from(PROTOCOL_VERSION) => {
                    (Refusal::VersionMismatch, version_message(theirs))
                }
                _ => (Refusal::BadRequest, e.to_string()),
            };
            refuse(&connection, Some(&mut send), code, message).await;
            return;
        }
    };
    let (protocol_version, library_id) = match &request {
        Request::Hello {
            protocol_version,
            library_id,
        }
        | Request::Join {
            protocol_version,
            library_id,
            ..
        } => (*protocol_version, *library_id),
        Request::Pull(_) | Request::Push(_) => {
            let message = "a session opens with `hello` or `join`".to_owned();
            refuse(&connection, Some(&mut send), Refusal::BadRequest, message).await;
            return;
        }
    };
    if protocol_version != PROTOCOL_VERSION {
        let message = version_message(u64::from(protocol_version));
        refuse(
            &connection,
            Some(&mut send),
            Refusal::VersionMismatch,
            message,
        )
        .await;
        return;
    }
    let Some(library) = shared.libraries.get(&library_id).cloned() else {
        let message = format!(
            "this device does not lead library {library_id}: the leader may have moved; \
             ask its current leader for an invite"
        );
        refuse(
            &connection,
            Some(&mut send),
            Refusal::UnknownLibrary,
            message,
        )
        .await;
        return;
    };
    match request {
        Request::Join {
            secret,
            access,
            name,
            ..
        } => {
            join(
                &connection,
                send,
                &library,
                fingerprint,
                &secret,
                access,
                name,
            )
            .await
        }
        Request::Hello { .. } => {
            let access = match admitted(&library, device).await {
                Ok(access) => access,
                Err((code, message)) => {
                    refuse(&connection, Some(&mut send), code, message).await;
                    return;
                }
            };
            let latest_seq = library.watch_latest_seq().get();
            let welcome = Response::Welcome {
                protocol_version: PROTOCOL_VERSION,
                access,
                latest_seq,
            };
            if frame::write(&mut send, &welcome).await.is_err() {
                return;
            }
            tracing::info!(%device, library = %library.id(), %access, "follower connected");
            session(connection, send, library, device, fingerprint, shared).await;
        }
        Request::Pull(_) | Request::Push(_) => {}
    }
}

fn version_message(theirs: u64) -> String {
    format!(
        "protocol version mismatch: the leader speaks sync protocol {PROTOCOL_VERSION}, this \
         device speaks {theirs}; update the older app so both run the same protocol"
    )
}

/// Whether `device` may sync `library` now, or the refusal to send.
async fn admitted(library: &Library, device: DeviceId) -> Result<Access, (Refusal, String)> {
    match library.admission(device).await {
        Ok(Admission::Member(access)) => Ok(access),
        Ok(Admission::NotMember) => Err((
            Refusal::NotMember,
            format!(
                "device {device} is not a member of library {}: ask its leader for an invite \
                 (`LeaderView::invite`), then join with its token (`Client::join`)",
                library.id()
            ),
        )),
        Ok(Admission::Revoked(at)) => Err((
            Refusal::Revoked,
            format!(
                "device {device} was revoked from library {} at {}: ask its leader for a new \
                 invite to rejoin",
                library.id(),
                chrono::DateTime::from_timestamp_millis(at)
                    .map_or_else(|| at.to_string(), |t| t.to_rfc3339())
            ),
        )),
        Err(e) => Err((
            Refusal::Internal,
            format!("the leader's database failed: {e}"),
        )),
    }
}

async fn join(
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    library: &LeaderView,
    key: KeyFingerprint,
    secret: &str,
    access: Access,
    name: Option<String>,
) {
    let device = key.device_id();
    let Some(secret) = crate::token::parse_hex32(secret) else {
        let message = "the invite's secret is malformed; copy the token again".to_owned();
        refuse(connection, Some(&mut send), Refusal::Invite, message).await;
        return;
    };
    let joined = match library
        .redeem_invite(&secret, access, key, name.as_deref())
        .await
    {
        Ok(access) => access,
        Err(e) => {
            refuse(connection, Some(&mut send), Refusal::Invite, e.to_string()).await;
            return;
        }
    };
    let library_name = library.name().await.unwrap_or_default();
    let reply = Response::Joined {
        protocol_version: PROTOCOL_VERSION,
        library_name,
        leader_device_id: library.device_id(),
        access: joined,
    };
    tracing::info!(%device, library = %library.id(), access = %joined, "device joined");
    if frame::write(&mut send, &reply).await.is_ok() && send.finish().is_ok() {
        // Let the joiner read the answer and close; it opens a session next.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    }
}

/// A member's session: announce new seqs on the control stream, answer requests, and end
/// it the moment the device is revoked.
async fn session(
    connection: quinn::Connection,
    mut control: quinn::SendStream,
    library: LeaderView,
    device: DeviceId,
    fingerprint: KeyFingerprint,
    shared: Arc<Shared>,
) {
    let _connected = Connected::open(&library);
    let mut latest = library.watch_latest_seq();
    let mut membership = library.watch_membership();
    // Every session rechecks at the same instants, so that a thousand sessions' checks
    // are read together (`Library::admission` gathers concurrent checks into one read)
    // rather than one read each, spread over the period.
    let period = shared
        .config
        .membership_recheck
        .max(Duration::from_millis(1));
    let phase = shared.started.elapsed().as_nanos() % period.as_nanos();
    let next = period.saturating_sub(Duration::from_nanos(phase as u64));
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + next, period);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut requests = JoinSet::new();
    let last_recorded = Arc::new(std::sync::Mutex::new(None::<Instant>));
    loop {
        tokio::select! {
            seq = latest.changed() => {
                let Some(latest_seq) = seq else { break };
                if frame::write(&mut control, &Response::Tip { latest_seq }).await.is_err() {
                    break;
                }
            }
            changed = membership.changed() => {
                if changed.is_err() || !still_member(&connection, &mut control, &library, device).await {
                    break;
                }
            }
            _ = recheck.tick() => {
                if !still_member(&connection, &mut control, &library, device).await {
                    break;
                }
            }
            stream = connection.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                while requests.try_join_next().is_some() {}
                requests.spawn(answer(
                    send,
                    recv,
                    library.clone(),
                    device,
                    Arc::clone(&last_recorded),
                    shared.config.request_timeout,
                ));
            }
        }
    }
    requests.abort_all();
    tracing::info!(%device, key = %fingerprint, "session ended");
}

async fn still_member(
    connection: &quinn::Connection,
    control: &mut quinn::SendStream,
    library: &Library,
    device: DeviceId,
) -> bool {
    match admitted(library, device).await {
        Ok(_) => true,
        // A failed check is not a revocation: keep the session, check again later.
        Err((Refusal::Internal, message)) => {
            tracing::warn!(%device, %message, "membership check failed");
            true
        }
        Err((code, message)) => {
            refuse(connection, Some(control), code, message).await;
            false
        }
    }
}

/// Answers one request stream. Every request gets an answer or a refusal; one that
/// cannot be answered (unreadable, or an answer that cannot be sent) is logged at warn
/// with the reason.
/// Answers one request stream.
#[tracing::instrument(
    name = "request",
    skip_all,
    fields(library = %library.id(), %device)
)]
async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    library: LeaderView,
    device: DeviceId,
    last_recorded: Arc<std::sync::Mutex<Option<Instant>>>,
    timeout: Duration,
) {
    let request = match tokio::time::timeout(timeout, frame::read::<Request>(&mut recv)).await {
        Ok(Ok(request)) => request,
        // The follower opened a stream and closed it: nothing was asked.
        Ok(Err(ReadError::Ended)) => return,
        failed => {
            let message = match failed {
                Ok(Err(e)) => format!("the request could not be read: {e}"),
                _ => format!("no request within {timeout:?}"),
            };
            reply(
                &mut send,
                device,
                "request",
                refused(Refusal::BadRequest, message),
            )
            .await;
            return;
        }
    };
    let (library_id, what) = match &request {
        Request::Pull(pull) => (pull.library_id, "pull"),
        Request::Push(push) => (push.library_id, "push"),
        _ => {
            let message = "only `pull` and `push` are answered inside a session".to_owned();
            reply(
                &mut send,
                device,
                "request",
                refused(Refusal::BadRequest, message),
            )
            .await;
            return;
        }
    };
    if library_id != library.id() {
        let message = format!(
            "this session is for library {}, not {library_id}",
            library.id()
        );
        reply(
            &mut send,
            device,
            what,
            refused(Refusal::BadRequest, message),
        )
        .await;
        return;
    }
    // Revocation is checked per request too: nothing is served after it.
    if let Err((code, message)) = admitted(&library, device).await {
        reply(&mut send, device, what, refused(code, message)).await;
        return;
    }
    match request {
        Request::Pull(mut pull) => {
            // The device is the one the handshake proved, whatever the request says.
            pull.device = Some(device);
            let answer = match library.serve_pull(&pull).await {
                Ok(response) => Response::Pulled(response),
                Err(PullError::HistoryDiverged(divergence)) => Response::Refused {
                    code: Refusal::HistoryDiverged,
                    message: divergence.to_string(),
                    divergence: Some(divergence),
                    epoch: None,
                    moved: None,
                },
                Err(e @ PullError::Superseded { epoch }) => superseded(epoch, e.to_string()),
                Err(PullError::Moved {
                    epoch,
                    leader,
                    addresses,
                }) => {
                    let message = format!(
                        "leadership of library {} is with device {leader} (epoch {epoch}); \
                         follow it",
                        library.id()
                    );
                    moved(epoch, leader, addresses, message)
                }
                Err(e) => refused(Refusal::Internal, e.to_string()),
            };
            reply(&mut send, device, what, answer).await;
            record_position(&library, device, pull.after, &last_recorded).await;
        }
        Request::Push(push) => {
            // A device pushes only its own changes: the TLS handshake proved which it is.
            let answer = if push.device_id != device {
                metrics::counter!(
                    sync_core::metrics::PUSH_CHANGES_REJECTED,
                    "library" => library.id().to_string(),
                    "device" => device.to_string(),
                    "reason" => "other_device",
                )
                .increment(push.changes.len() as u64);
                refused(
                    Refusal::BadRequest,
                    format!(
                        "this session is device {device}'s; it cannot push for {}",
                        push.device_id
                    ),
                )
            } else {
                match library.serve_push(&push).await {
                    Ok(response) => Response::Pushed(response),
                    Err(e @ sync_core::PushError::NotWriter { .. }) => {
                        refused(Refusal::ReadOnly, e.to_string())
                    }
                    Err(e @ sync_core::PushError::BadChange { .. }) => {
                        refused(Refusal::SchemaMismatch, e.to_string())
                    }
                    Err(e @ sync_core::PushError::Superseded { epoch }) => {
                        superseded(epoch, e.to_string())
                    }
                    Err(e @ sync_core::PushError::Moved { epoch, leader }) => {
                        let addresses = library
                            .members()
                            .await
                            .ok()
                            .and_then(|members| members.into_iter().find(|m| m.device_id == leader))
                            .map(|m| m.addresses)
                            .unwrap_or_default();
                        moved(epoch, leader, addresses, e.to_string())
                    }
                    Err(e) => refused(Refusal::Internal, e.to_string()),
                }
            };
            reply(&mut send, device, what, answer).await;
        }
        _ => {}
    }
}

fn refused(code: Refusal, message: String) -> Response {
    Response::Refused {
        code,
        message,
        divergence: None,
        epoch: None,
        moved: None,
    }
}

/// The refusal of a leader that has been replaced, naming the newer epoch.
fn superseded(epoch: sync_core::Epoch, message: String) -> Response {
    Response::Refused {
        code: Refusal::Superseded,
        message,
        divergence: None,
        epoch: Some(epoch),
        moved: None,
    }
}

/// The refusal of a device that does not lead the library, naming the leader.
fn moved(
    epoch: sync_core::Epoch,
    leader: DeviceId,
    addresses: Vec<String>,
    message: String,
) -> Response {
    Response::Refused {
        code: Refusal::Moved,
        message,
        divergence: None,
        epoch: Some(epoch),
        moved: Some(crate::frame::MovedTo { leader, addresses }),
    }
}

/// Sends `answer` to a request (`what`: a pull, a push) and finishes the stream.
///
/// An answer that cannot be encoded — larger than [`frame::FRAME_BODY_MAX`] — is replaced
/// by a refusal that says so, rather than leaving the follower with a stream that just
/// ends. Refusals for which the leader is at fault (`Internal`) or that say the request
/// was malformed are logged at warn, and so is an answer that cannot be delivered; the
/// refusals of ordinary membership (not a member, revoked, read-only) at info, like a
/// divergence (`serve_pull` logs that at warn itself).
async fn reply(send: &mut quinn::SendStream, device: DeviceId, what: &str, answer: Response) {
    let bytes = match frame::encode(&answer) {
        Ok(bytes) => bytes,
        Err(e) => {
            let message = format!("the leader cannot send its answer to this {what}: {e}");
            let refusal = refused(Refusal::Internal, message);
            match frame::encode(&refusal) {
                Ok(bytes) => {
                    log_refusal(device, what, &refusal);
                    bytes
                }
                Err(e) => {
                    tracing::warn!(%device, what, %e, "request not answered: even its refusal cannot be encoded");
                    return;
                }
            }
        }
    };
    if let Response::Refused { .. } = answer {
        log_refusal(device, what, &answer);
    }
    if let Err(e) = send.write_all(&bytes).await {
        tracing::warn!(%device, what, %e, "request not answered: the answer could not be sent");
        return;
    }
    let _ = send.finish();
}

fn log_refusal(device: DeviceId, what: &str, refusal: &Response) {
    let Response::Refused { code, message, .. } = refusal else {
        return;
    };
    match code {
        // Membership's ordinary refusals; and a divergence, which `serve_pull` has
        // logged at warn already.
        Refusal::NotMember
        | Refusal::Revoked
        | Refusal::ReadOnly
        | Refusal::HistoryDiverged
        | Refusal::Superseded
        | Refusal::Moved => {
            tracing::info!(%device, what, ?code, %message, "request refused");
        }
        _ => tracing::warn!(%device, what, ?code, %message, "request refused"),
    }
}

/// Records where a follower stands, at most once a second per session: status needs it,
/// a write per pull would cost the leader's database more than it is worth.
async fn record_position(
    library: &LeaderView,
    device: DeviceId,
    after: sync_core::Seq,
    last: &std::sync::Mutex<Option<Instant>>,
) {
    {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
    }
    if let Err(e) = library.record_peer_position(device, after).await {
        tracing::debug!(%device, %e, "recording a follower's position failed");
    }
}

/// Counts a session in `sync_connected_followers` for as long as it lives (also when its
/// task is aborted).
struct Connected(String);

impl Connected {
    fn open(library: &Library) -> Connected {
        let library = library.id().to_string();
        metrics::gauge!(sync_core::metrics::CONNECTED_FOLLOWERS, "library" => library.clone())
            .increment(1.0);
        Connected(library)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!(sync_core::metrics::CONNECTED_FOLLOWERS, "library" => self.0.clone())
            .decrement(1.0);
    }
}
