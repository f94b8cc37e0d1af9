//! The follower's side: join a library with a token, open sessions, pull, and hear the
//! leader's announcements of new seqs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sync_core::{
    Access, DeviceId, DeviceKey, KeyFingerprint, LibraryId, PROTOCOL_VERSION, PullError,
    PullRequest, PullResponse, PushError, PushRequest, PushResponse, Refused, Seq, Transport,
};
use tokio::sync::watch;

use crate::frame::{self, ReadError, Refusal, Request, Response};
use crate::token::JoinToken;
use crate::{TransportError, tls};

/// Deadlines of a follower.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// For reaching the leader and its first answer.
    pub connect_timeout: Duration,
    /// For one request's answer.
    pub request_timeout: Duration,
    /// Keep-alives, so that an idle session survives the leader's idle timeout, and so
    /// that a follower of a leader that died without closing hears of its restart within
    /// this long (the restarted leader answers them with a stateless reset).
    pub keep_alive: Duration,
    /// A connection silent this long is considered lost.
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            // A packet of about 50 bytes a second per session.
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What joining a library gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The library.
    pub library_id: LibraryId,
    /// Its name.
    pub library_name: String,
    /// Its leader.
    pub leader_device_id: DeviceId,
    /// What this device may do.
    pub access: Access,
}

/// A device's QUIC client.
#[derive(Clone, Debug)]
pub struct Client {
    key: Arc<DeviceKey>,
    config: ClientConfig,
}

/// An open session with a leader on one library.
#[derive(Debug)]
pub struct Session {
    // Kept for as long as the connection lives.
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    library_id: LibraryId,
    access: Access,
    request_timeout: Duration,
    /// The refusal the leader sent on the control stream (a revocation), if any.
    refusal: Arc<Mutex<Option<TransportError>>>,
    control: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.control.abort();
        self.connection.close(0u32.into(), b"done");
    }
}

impl Client {
    /// A client that presents `key`.
    pub fn new(key: DeviceKey, config: ClientConfig) -> Client {
        Client {
            key: Arc::new(key),
            config,
        }
    }

    /// Redeems `token` with the leader it names: this device becomes a member.
    pub async fn join(
        &self,
        token: &JoinToken,
        name: Option<&str>,
    ) -> Result<Joined, TransportError> {
        let pin = token
            .fingerprint()
            .map_err(|e| TransportError::Config(e.to_string()))?;
        // Any of the leader's server processes redeems the invite (they share its
        // database): the first one that answers.
        let mut dialled = Err(TransportError::Config("the token names no address".into()));
        for address in token.addresses() {
            dialled = self.dial(&address, pin).await;
            match &dialled {
                Ok(_) => break,
                Err(e) if e.another_address_may_answer() => {
                    tracing::debug!(%address, %e, "trying the leader's next address");
                }
                Err(_) => break,
            }
        }
        let (endpoint, connection) = dialled?;
        let request = Request::Join {
            protocol_version: PROTOCOL_VERSION,
            library_id: token.library_id,
            secret: token.secret.clone(),
            access: token.access,
            name: name.map(str::to_owned),
        };
        let answer = self.first_exchange(&connection, &request).await;
        connection.close(0u32.into(), b"joined");
        drop(endpoint);
        match answer? {
            (
                Response::Joined {
                    library_name,
                    leader_device_id,
                    access,
                    ..
                },
                _,
            ) => Ok(Joined {
                library_id: token.library_id,
                library_name,
                leader_device_id,
                access,
            }),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Opens a session on `library_id` with the leader at `address`, whose key must have
    /// the fingerprint `pin`. `latest` receives the leader's announcements of new seqs.
    pub async fn connect(
        &self,
        address: &str,
        pin: KeyFingerprint,
        library_id: LibraryId,
        latest: watch::Sender<Seq>,
    ) -> Result<Session, TransportError> {
        let (endpoint, connection) = self.dial(address, pin).await?;
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            library_id,
        };
        let (welcome, mut control) = self.first_exchange(&connection, &hello).await?;
        let Response::Welcome {
            access, latest_seq, ..
        } = welcome
        else {
            return Err(unexpected(&welcome));
        };
        latest.send_replace(latest_seq);
        let refusal = Arc::new(Mutex::new(None));
        let control = tokio::spawn({
            let refusal = Arc::clone(&refusal);
            async move {
                loop {
                    match frame::read::<Response>(&mut control).await {
                        Ok(Response::Tip { latest_seq }) => {
                            latest.send_replace(latest_seq);
                        }
                        Ok(Response::Refused { code, message, .. }) => {
                            *refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(TransportError::Refused { code, message });
                            // Wake the follower so it learns at once.
                            latest.send_modify(|_| {});
                            return;
                        }
                        Ok(other) => {
                            tracing::warn!(?other, "unexpected message on the control stream");
                        }
                        Err(_) => {
                            latest.send_modify(|_| {});
                            return;
                        }
                    }
                }
            }
        });
        Ok(Session {
            _endpoint: endpoint,
            connection,
            library_id,
            access,
            request_timeout: self.config.request_timeout,
            refusal,
            control,
        })
    }

    /// Opens the control stream, sends `request`, reads the first answer.
    async fn first_exchange(
        &self,
        connection: &quinn::Connection,
        request: &Request,
    ) -> Result<(Response, quinn::RecvStream), TransportError> {
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| connection_error(connection, e.to_string()))?;
            frame::write(&mut send, request)
                .await
                .map_err(|e| connection_error(connection, e.to_string()))?;
            let answer = frame::read::<Response>(&mut recv)
                .await
                .map_err(|e| read_error(connection, e))?;
            Ok::<_, TransportError>((answer, recv))
        };
        let (answer, recv) = tokio::time::timeout(self.config.connect_timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout("the leader's first answer"))??;
        if let Response::Refused { code, message, .. } = answer {
            return Err(TransportError::Refused { code, message });
        }
        Ok((answer, recv))
    }

    /// Dials the leader and writes `bytes` as the first thing on the control stream, then
    /// returns the leader's first answer: for tests and diagnostics of a leader's
    /// refusals (malformed frames, other protocol versions).
    #[doc(hidden)]
    pub async fn send_raw(
        &self,
        address: &str,
        pin: KeyFingerprint,
        bytes: &[u8],
    ) -> Result<Response, TransportError> {
        let (_endpoint, connection) = self.dial(address, pin).await?;
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| connection_error(&connection, e.to_string()))?;
            send.write_all(bytes)
                .await
                .map_err(|e| connection_error(&connection, e.to_string()))?;
            let _ = send.finish();
            frame::read::<Response>(&mut recv)
                .await
                .map_err(|e| read_error(&connection, e))
        };
        tokio::time::timeout(self.config.connect_timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout("the leader's first answer"))?
    }

    /// A bare connection to the leader, for tests of what a misbehaving peer costs it.
    #[doc(hidden)]
    pub async fn dial_raw(
        &self,
        address: &str,
        pin: KeyFingerprint,
    ) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
        self.dial(address, pin).await
    }

    async fn dial(
        &self,
        address: &str,
        pin: KeyFingerprint,
    ) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
        let target = resolve(address).await?;
        let bind: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(TransportError::Io)?;
        let seen = Arc::new(Mutex::new(None));
        let crypto = tls::client_config(&self.key, pin, Arc::clone(&seen))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(self.config.keep_alive))
            .max_idle_timeout(Some(
                self.config
                    .idle_timeout
                    .try_into()
                    .map_err(|_| TransportError::Config("idle timeout too long".into()))?,
            ));
        config.transport_config(Arc::new(transport));
        let connecting = endpoint
            .connect_with(config, target, tls::SERVER_NAME)
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let connection = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                let found = *seen.lock().unwrap_or_else(|p| p.into_inner());
                return Err(match found {
                    Some(found) if found != pin => TransportError::WrongLeader {
                        address: address.to_owned(),
                        expected: pin,
                        found,
                    },
                    _ => TransportError::Unreachable {
                        address: address.to_owned(),
                        reason: e.to_string(),
                    },
                });
            }
            Err(_) => {
                return Err(TransportError::Unreachable {
                    address: address.to_owned(),
                    reason: format!("no answer within {:?}", self.config.connect_timeout),
                });
            }
        };
        Ok((endpoint, connection))
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, TransportError> {
    let mut found = tokio::net::lookup_host(address)
        .await
        .map_err(|e| TransportError::Address(format!("`{address}`: {e}")))?;
    found
        .next()
        .ok_or_else(|| TransportError::Address(format!("`{address}` resolves to nothing")))
}

fn unexpected(response: &Response) -> TransportError {
    TransportError::Protocol(format!("unexpected answer from the leader: {response:?}"))
}

/// The leader's reason, when it closed the connection with one; else `fallback`.
fn connection_error(connection: &quinn::Connection, fallback: String) -> TransportError {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            let message = String::from_utf8_lossy(&close.reason).into_owned();
            match refusal_of(close.error_code.into_inner()) {
                Some(code) => TransportError::Refused { code, message },
                None => {
                    TransportError::Lost(format!("the leader closed the connection: {message}"))
                }
            }
        }
        Some(other) => TransportError::Lost(other.to_string()),
        None => TransportError::Lost(fallback),
    }
}

fn read_error(connection: &quinn::Connection, e: ReadError) -> TransportError {
    match e {
        ReadError::Frame(e) => TransportError::Frame(e),
        other => connection_error(connection, other.to_string()),
    }
}

fn refusal_of(code: u64) -> Option<Refusal> {
    [
        Refusal::VersionMismatch,
        Refusal::UnknownLibrary,
        Refusal::NotMember,
        Refusal::Revoked,
        Refusal::Invite,
        Refusal::BadRequest,
        Refusal::Internal,
        Refusal::ReadOnly,
        Refusal::HistoryDiverged,
        Refusal::SchemaMismatch,
        Refusal::Superseded,
        Refusal::Moved,
    ]
    .into_iter()
    .find(|r| u64::from(r.close_code()) == code)
}

impl Session {
    /// What the leader lets this device do.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Whether the connection is gone (closed, lost or refused).
    pub fn is_closed(&self) -> bool {
        self.connection.close_reason().is_some() || self.refused().is_some()
    }

    fn refused(&self) -> Option<TransportError> {
        self.refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(TransportError::clone_refusal)
    }

    /// Sends a pull request and waits for its answer.
    pub async fn pull(&self, request: &PullRequest) -> Result<PullResponse, TransportError> {
        match self
            .exchange(
                request.library_id,
                Request::Pull(request.clone()),
                "a pull's answer",
            )
            .await?
        {
            Response::Pulled(response) => Ok(response),
            Response::Refused {
                divergence: Some(divergence),
                ..
            } => Err(TransportError::HistoryDiverged(divergence)),
            Response::Refused {
                code: Refusal::Superseded,
                message,
                epoch: Some(epoch),
                ..
            } => Err(TransportError::Superseded { epoch, message }),
            Response::Refused {
                code: Refusal::Moved,
                message,
                epoch,
                moved: Some(moved),
                ..
            } => Err(TransportError::Moved {
                epoch: epoch.unwrap_or_default(),
                leader: moved.leader,
                addresses: moved.addresses,
                message,
            }),
            Response::Refused { code, message, .. } => {
                Err(TransportError::Refused { code, message })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Sends outbox changes and waits for the leader's acknowledgement.
    pub async fn push(&self, request: &PushRequest) -> Result<PushResponse, TransportError> {
        match self
            .exchange(
                request.library_id,
                Request::Push(request.clone()),
                "a push's answer",
            )
            .await?
        {
            Response::Pushed(response) => Ok(response),
            Response::Refused {
                code: Refusal::Superseded,
                message,
                epoch: Some(epoch),
                ..
            } => Err(TransportError::Superseded { epoch, message }),
            Response::Refused {
                code: Refusal::Moved,
                message,
                epoch,
                moved: Some(moved),
                ..
            } => Err(TransportError::Moved {
                epoch: epoch.unwrap_or_default(),
                leader: moved.leader,
                addresses: moved.addresses,
                message,
            }),
            Response::Refused { code, message, .. } => {
                Err(TransportError::Refused { code, message })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// One request on its own stream, and its answer.
    async fn exchange(
        &self,
        library_id: LibraryId,
        request: Request,
        what: &'static str,
    ) -> Result<Response, TransportError> {
        if let Some(refused) = self.refused() {
            return Err(refused);
        }
        if library_id != self.library_id {
            return Err(TransportError::Config(format!(
                "this session is for library {}, not {library_id}",
                self.library_id
            )));
        }
        let connection = &self.connection;
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| connection_error(connection, e.to_string()))?;
            frame::write(&mut send, &request)
                .await
                .map_err(|e| connection_error(connection, e.to_string()))?;
            let _ = send.finish();
            frame::read::<Response>(&mut recv)
                .await
                .map_err(|e| read_error(connection, e))
        };
        let answer = tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(what))?;
        match answer {
            Ok(answer) => Ok(answer),
            // The control stream may hold the real reason (a revocation).
            Err(e) => Err(self.refused().unwrap_or(e)),
        }
    }
}

/// `sync_core::Transport` over QUIC: one session at a time, opened on first use and again
/// after it is lost; the follow loop's backoff paces the retries.
///
/// A leader may serve from several processes on one PostgreSQL database, each at its own
/// address (`with_addresses`). The transport keeps a session with one of them; when it
/// cannot open one there, or a session there is lost, it moves on to the next address
/// (the one that was lost is tried last), so the followers of a process that dies move to
/// the others, and a follower does not return to a dead address before every other one
/// failed too.
#[derive(Debug)]
pub struct QuicTransport {
    client: Client,
    addresses: Mutex<Addresses>,
    /// The leader's key: replaced when the leader moves (`Transport::leader_moved`).
    pin: Mutex<KeyFingerprint>,
    library_id: LibraryId,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    latest: watch::Sender<Seq>,
    news: tokio::sync::Mutex<watch::Receiver<Seq>>,
    /// The address of the open session, or the last one (none before the first).
    connected: watch::Sender<Option<String>>,
}

/// The addresses a transport may reach its leader at, and which one it uses now.
#[derive(Debug)]
struct Addresses {
    all: Vec<String>,
    /// Index into `all` of the address to try first.
    current: usize,
}

impl Addresses {
    /// The addresses in the order to try them: the current one first.
    fn in_turn(&self) -> Vec<(usize, String)> {
        let n = self.all.len();
        (0..n)
            .map(|i| (self.current + i) % n)
            .map(|i| (i, self.all[i].clone()))
            .collect()
    }
}

/// How long a connection of a transport with several addresses may be silent before it is
/// given up for another address (at most; `ClientConfig::idle_timeout` if shorter). With
/// keep-alives every second, five missed ones.
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

impl QuicTransport {
    /// A transport to the leader of `library_id` at `address`, pinned to `pin`.
    pub fn new(client: Client, address: &str, pin: KeyFingerprint, library_id: LibraryId) -> Self {
        QuicTransport::with_addresses(client, vec![address.to_owned()], pin, library_id)
    }

    /// A transport to the leader of `library_id`, which serves at each of `addresses`
    /// (several processes on one database; tried in this order), pinned to `pin`.
    ///
    /// With more than one address, a connection silent for `FAILOVER_IDLE_TIMEOUT` is
    /// given up, so that a follower of a process that died without closing (SIGKILL,
    /// power loss) moves to another process within seconds rather than the idle timeout.
    pub fn with_addresses(
        mut client: Client,
        addresses: Vec<String>,
        pin: KeyFingerprint,
        library_id: LibraryId,
    ) -> Self {
        if addresses.len() > 1 {
            client.config.idle_timeout = client.config.idle_timeout.min(FAILOVER_IDLE_TIMEOUT);
        }
        let (latest, news) = watch::channel(Seq::ZERO);
        QuicTransport {
            client,
            addresses: Mutex::new(Addresses {
                all: addresses,
                current: 0,
            }),
            pin: Mutex::new(pin),
            library_id,
            session: tokio::sync::Mutex::new(None),
            latest,
            news: tokio::sync::Mutex::new(news),
            connected: watch::Sender::new(None),
        }
    }

    /// The leader's latest seq, as last announced.
    pub fn leader_latest_seq(&self) -> Seq {
        *self.latest.borrow()
    }

    /// Opens a session now (or returns the open one).
    pub async fn session(&self) -> Result<Arc<Session>, TransportError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref()
            && !session.is_closed()
        {
            return Ok(Arc::clone(session));
        }
        if slot.take().is_some() {
            // The session there was lost: try the others first.
            self.move_on();
        }
        let in_turn = self.addresses().in_turn();
        let mut last = Err(TransportError::Config("no leader address".into()));
        for (index, address) in in_turn {
            last = self
                .client
                .connect(&address, self.pin(), self.library_id, self.latest.clone())
                .await;
            match &last {
                Ok(_) => {
                    self.addresses().current = index;
                    self.connected.send_if_modified(|connected| {
                        let moved = connected.as_deref() != Some(address.as_str());
                        *connected = Some(address.clone());
                        moved
                    });
                    break;
                }
                Err(e) if e.another_address_may_answer() => {
                    tracing::debug!(%address, %e, "trying the leader's next address");
                }
                // A refusal of this device: every process would say the same.
                Err(_) => break,
            }
        }
        let session = Arc::new(last?);
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    /// The address this transport uses now (or tries first).
    pub fn current_address(&self) -> String {
        let addresses = self.addresses();
        addresses.all[addresses.current].clone()
    }

    /// The address of each session it opens, as it opens them: it changes when the
    /// transport moves to another of the leader's addresses.
    pub fn watch_connected(&self) -> watch::Receiver<Option<String>> {
        self.connected.subscribe()
    }

    /// Every address it may reach the leader at, in order.
    pub fn addresses_known(&self) -> Vec<String> {
        self.addresses().all.clone()
    }

    /// The key it pins the leader to now.
    pub fn pin(&self) -> KeyFingerprint {
        *self.pin.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn addresses(&self) -> std::sync::MutexGuard<'_, Addresses> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops `session` if it is lost, and moves on to the next address: once, however many
    /// requests found it lost.
    async fn forget_if_lost(&self, session: &Arc<Session>) {
        if !session.is_closed() {
            return;
        }
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|open| Arc::ptr_eq(open, session)) {
            *slot = None;
            self.move_on();
        }
    }

    /// The next address becomes the one to try first.
    fn move_on(&self) {
        let mut addresses = self.addresses();
        addresses.current = (addresses.current + 1) % addresses.all.len().max(1);
    }

    /// Closes the session (the next request opens a new one).
    pub async fn disconnect(&self) {
        self.session.lock().await.take();
    }
}

/// A transport failure as the pull protocol reports it: a refusal of this device, typed
/// (retrying cannot fix it), or a failure to reach the leader.
fn pull_error(e: TransportError) -> PullError {
    match e {
        TransportError::Moved {
            epoch,
            leader,
            addresses,
            ..
        } => PullError::Moved {
            epoch,
            leader,
            addresses,
        },
        TransportError::HistoryDiverged(divergence) => PullError::HistoryDiverged(divergence),
        TransportError::Superseded { epoch, .. } => PullError::Superseded { epoch },
        e => match refused_kind(&e) {
            Some(kind) => PullError::Refused {
                kind,
                message: e.to_string(),
            },
            None => PullError::Transport(e.to_string()),
        },
    }
}

/// `pull_error` for pushes.
fn push_error(e: TransportError) -> PushError {
    if let TransportError::Superseded { epoch, .. } = e {
        return PushError::Superseded { epoch };
    }
    if let TransportError::Moved { epoch, leader, .. } = e {
        return PushError::Moved { epoch, leader };
    }
    match refused_kind(&e) {
        Some(kind) => PushError::Refused {
            kind,
            message: e.to_string(),
        },
        None => PushError::Transport(e.to_string()),
    }
}

fn refused_kind(e: &TransportError) -> Option<Refused> {
    match e {
        TransportError::WrongLeader { .. } => Some(Refused::WrongLeader),
        TransportError::Refused { code, .. } => match code {
            Refusal::Revoked => Some(Refused::Revoked),
            Refusal::NotMember => Some(Refused::NotMember),
            Refusal::ReadOnly => Some(Refused::ReadOnly),
            Refusal::UnknownLibrary => Some(Refused::UnknownLibrary),
            Refusal::VersionMismatch => Some(Refused::ProtocolVersion),
            Refusal::SchemaMismatch => Some(Refused::SchemaVersion),
            Refusal::Superseded => Some(Refused::Superseded),
            _ => None,
        },
        _ => None,
    }
}

#[async_trait::async_trait]
impl Transport for QuicTransport {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        let session = self.session().await.map_err(pull_error)?;
        match session.pull(&request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                self.forget_if_lost(&session).await;
                Err(pull_error(e))
            }
        }
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        let session = self.session().await.map_err(push_error)?;
        match session.push(&request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                self.forget_if_lost(&session).await;
                Err(push_error(e))
            }
        }
    }

    async fn news(&self) {
        let mut news = self.news.lock().await;
        if news.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Re-points at the new leader: its key, its addresses (in the order given); the open
    /// session is dropped, the next request connects there. Without an address to reach
    /// it, nothing changes (false).
    async fn leader_moved(&self, to: &sync_core::LeaderMoved) -> bool {
        if to.library_id != self.library_id || to.addresses.is_empty() {
            return false;
        }
        let mut slot = self.session.lock().await;
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = to.key;
        {
            let mut addresses = self.addresses();
            addresses.all = to.addresses.clone();
            addresses.current = 0;
        }
        slot.take();
        true
    }
}
