//! The app's networking: serve a library over QUIC, invite devices, join, follow. The CLI
//! commands `serve`, `invite`, `join`, `follow`, `devices` and `revoke` are thin shells
//! over these functions, so tests drive exactly what the CLI does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use sea_orm_migration::MigratorTrait;
use sync_core::{Access, KeyFingerprint, Library, OpenError, Position, Role, SyncError};
use sync_transport::{Client, ClientConfig, JoinToken, QuicTransport, Server, ServerConfig};

use crate::{Migrator, connect, registry};

/// Leader: where `serve` last listened (what `invite` advertises when no `serve` is
/// running now).
pub const SERVE_ADDRESS: &str = "serve_address";
/// Leader: one setting per running `serve` process, `serving/ADDRESS` → the time of its
/// latest heartbeat (ms since the epoch). Several processes serving one library from one
/// PostgreSQL database each keep theirs; `invite` puts every live one in the token.
pub const SERVING_PREFIX: &str = "serving/";
/// How often a `serve` process renews its `serving/` setting.
pub const SERVING_HEARTBEAT: Duration = Duration::from_secs(5);
/// A `serving/` setting older than this is a process that died without removing it.
pub const SERVING_STALE: Duration = Duration::from_secs(15);
/// Follower: where the leader was last reached: one address, or several separated by
/// commas (a leader serving from several processes), tried in turn.
pub const LEADER_ADDRESS: &str = "leader_address";
/// Follower: the leader's pinned key fingerprint.
pub const LEADER_KEY: &str = "leader_key";
/// Follower: the leader's latest seq as of the last sync.
pub const LEADER_LATEST: &str = "leader_latest_seq";
/// Follower: the last sync error, cleared by a successful sync.
pub const LAST_ERROR: &str = "last_error";

/// Serves `library` on `listen` and remembers the address for `invite`.
pub async fn serve(library: &Library, listen: SocketAddr) -> Result<Server> {
    let key = library.device_key().await?;
    // Whatever this device's role: a follower's server serves nothing until it leads.
    let server = Server::bind(listen, &key, vec![library.clone()], ServerConfig::default()).await?;
    let address = advertised(server.local_addr()).to_string();
    library.set_local_setting(SERVE_ADDRESS, &address).await?;
    // Its pulls say where it serves, so a handoff to it tells the others.
    library.set_serving_addresses(vec![address]);
    Ok(server)
}

/// The `sync_local` setting through which `handoff` asks a running `serve` to hand the
/// library on (the device id), and where that `serve` answers (`HANDOFF_RESULT`).
pub const HANDOFF_REQUEST: &str = "handoff_request";
/// The answer to a `HANDOFF_REQUEST`: `ok epoch SEQ` or `error MESSAGE`.
pub const HANDOFF_RESULT: &str = "handoff_result";
/// How often a `serve` looks at its role and for a handoff request.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// How long a handoff asked through `serve` waits for its target.
pub const HANDOFF_WITHIN: Duration = Duration::from_secs(60);

/// What a `serve` does besides serving: while this device does not lead, it follows the
/// leader (so a handoff needs no restart: the follow loop takes the log over, and the
/// server serves once it leads); while it leads, it carries out `handoff` requests, and
/// follows the new leader after one.
pub fn supervise(library: Library) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut follow: Option<sync_core::Follow> = None;
        let mut followed = None;
        loop {
            let leadership = library.leadership();
            let leads = leadership.leader == library.device_id() && !leadership.taking_over;
            if leads {
                if let Some(f) = follow.take() {
                    f.stop().await;
                    tracing::info!(library = %library.id(), epoch = %leadership.epoch, "this device leads the library now");
                }
                if let Err(e) = hand_off_if_asked(&library).await {
                    tracing::warn!(%e, "a handoff request failed");
                }
            } else if follow.is_none() || followed != Some(leadership.leader) {
                if library.role() == Role::Follower && follow.is_none() {
                    match transport(&library, None).await {
                        Ok(transport) => {
                            if let Ok(view) = library.follower() {
                                follow = Some(view.start_following(
                                    transport,
                                    sync_core::FollowConfig::default(),
                                ));
                                followed = Some(leadership.leader);
                                tracing::info!(library = %library.id(), leader = %leadership.leader, "following the leader");
                            }
                        }
                        Err(e) => tracing::warn!(%e, "cannot follow the leader yet"),
                    }
                } else {
                    // The loop re-points by itself after a move.
                    followed = Some(leadership.leader);
                }
            }
            tokio::time::sleep(SUPERVISE_EVERY).await;
        }
    })
}

/// Carries out a `handoff` request stored for this library, if there is one (one `serve`
/// process claims it: removing the request is the claim).
async fn hand_off_if_asked(library: &Library) -> Result<()> {
    let Some(target) = library.local_setting(HANDOFF_REQUEST).await? else {
        return Ok(());
    };
    if !library.remove_local_setting(HANDOFF_REQUEST).await? {
        return Ok(());
    }
    let outcome = match target.parse() {
        Ok(to) => match library.leader()?.hand_off(to, HANDOFF_WITHIN).await {
            Ok(done) => format!("ok {} {}", done.epoch, done.record_seq),
            Err(e) => format!("error {e}"),
        },
        Err(e) => format!("error `{target}` is not a device id: {e}"),
    };
    library.set_local_setting(HANDOFF_RESULT, &outcome).await?;
    Ok(())
}

/// Asks the `serve` running for this library to hand it to `to`, and waits for the
/// answer. Refused when no `serve` runs: the target pulls the log through it.
pub async fn hand_off(library: &Library, to: &str) -> Result<String> {
    let to: sync_core::DeviceId = to
        .parse()
        .with_context(|| format!("`{to}` is not a device id (see `devices`)"))?;
    let view = library.leader()?;
    drop(view);
    if serving_addresses(library).await?.is_empty() {
        bail!(
            "no `serve` runs for library {}: start `serve` here (the target pulls the log \
             through it), then hand off",
            library.id()
        );
    }
    library.remove_local_setting(HANDOFF_RESULT).await?;
    library
        .set_local_setting(HANDOFF_REQUEST, &to.to_string())
        .await?;
    let deadline = tokio::time::Instant::now() + HANDOFF_WITHIN + Duration::from_secs(30);
    loop {
        if let Some(result) = library.local_setting(HANDOFF_RESULT).await? {
            library.remove_local_setting(HANDOFF_RESULT).await?;
            return match result.strip_prefix("ok ") {
                Some(rest) => {
                    let mut parts = rest.split(' ');
                    let epoch = parts.next().unwrap_or_default();
                    let seq = parts.next().unwrap_or_default();
                    Ok(format!(
                        "handed library {} to {to}: epoch {epoch} begins after the move record at seq {seq}",
                        library.id()
                    ))
                }
                None => bail!("{}", result.strip_prefix("error ").unwrap_or(&result)),
            };
        }
        if tokio::time::Instant::now() > deadline {
            library.remove_local_setting(HANDOFF_REQUEST).await?;
            bail!(
                "the running `serve` did not answer the handoff request in time; is it still running?"
            );
        }
        tokio::time::sleep(SUPERVISE_EVERY).await;
    }
}

/// A `serve` process's entry among the library's serving addresses (`SERVING_PREFIX`),
/// renewed every `SERVING_HEARTBEAT` while it lives. `end` removes it; a process that
/// dies without ending it is left out by `invite` once the entry is `SERVING_STALE`.
#[derive(Debug)]
pub struct Registration {
    library: Library,
    key: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Registers `server`'s advertised address for `library` and keeps it fresh.
    pub async fn start(library: &Library, server: &Server) -> Result<Registration> {
        Registration::start_at(library, &advertised(server.local_addr()).to_string()).await
    }

    /// Registers `address` for `library` and keeps it fresh.
    pub async fn start_at(library: &Library, address: &str) -> Result<Registration> {
        let key = format!("{SERVING_PREFIX}{address}");
        library
            .set_local_setting(&key, &now_ms().to_string())
            .await?;
        let heartbeat = tokio::spawn({
            let library = library.clone();
            let key = key.clone();
            async move {
                loop {
                    tokio::time::sleep(SERVING_HEARTBEAT).await;
                    if let Err(e) = library.set_local_setting(&key, &now_ms().to_string()).await {
                        tracing::warn!(%e, "renewing this server's address failed; will retry");
                    }
                }
            }
        });
        Ok(Registration {
            library: library.clone(),
            key,
            heartbeat,
        })
    }

    /// Stops renewing and removes the entry (a process that stops serving).
    pub async fn end(self) -> Result<()> {
        self.heartbeat.abort();
        self.library.remove_local_setting(&self.key).await?;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The addresses of the `serve` processes running for `library` now (their heartbeat is
/// fresh), in a random rotation, so that the followers of successive invites start at
/// different processes. Entries of processes that died are removed (a live process that
/// missed its heartbeats writes its entry again at the next).
pub async fn serving_addresses(library: &Library) -> Result<Vec<String>> {
    let fresh_after = now_ms() - SERVING_STALE.as_millis() as i64;
    let mut live = Vec::new();
    for (key, beat) in library.local_settings_starting_with(SERVING_PREFIX).await? {
        if beat.parse::<i64>().is_ok_and(|beat| beat >= fresh_after) {
            live.extend(key.strip_prefix(SERVING_PREFIX).map(str::to_owned));
        } else {
            library.remove_local_setting(&key).await?;
        }
    }
    if !live.is_empty() {
        let turn = rand::random_range(0..live.len());
        live.rotate_left(turn);
    }
    Ok(live)
}

/// A stored `LEADER_ADDRESS` (one address or several, comma-separated) as a list.
pub fn split_addresses(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Stores the leader's addresses `known` with `address` (the one a session is open with)
/// first, so that the next start tries it first rather than one that was lost.
pub async fn remember_first_address(
    library: &Library,
    known: &[String],
    address: &str,
) -> Result<()> {
    let Some(at) = known.iter().position(|a| a == address) else {
        return Ok(());
    };
    let mut order = known.to_vec();
    order.rotate_left(at);
    library
        .set_local_setting(LEADER_ADDRESS, &order.join(","))
        .await?;
    Ok(())
}

/// The address to advertise for a server listening on `local`: a wildcard address
/// (`0.0.0.0`, `::`) is replaced by this machine's address on its default route, which is
/// what another device would dial (`invite --address` overrides it).
fn advertised(local: SocketAddr) -> SocketAddr {
    if !local.ip().is_unspecified() {
        return local;
    }
    // Connecting a UDP socket sends nothing; it only picks the outgoing interface.
    let probe = if local.is_ipv4() {
        std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
    } else {
        std::net::UdpSocket::bind("[::]:0").and_then(|s| {
            s.connect("[2001:db8::1]:9")?;
            s.local_addr()
        })
    };
    match probe {
        Ok(found) if !found.ip().is_unspecified() => SocketAddr::new(found.ip(), local.port()),
        _ => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port()),
    }
}

/// Issues an invite and returns its token. `address` defaults to the addresses of every
/// `serve` process running for the library now, else to where `serve` last listened.
pub async fn invite(
    library: &Library,
    access: Access,
    ttl: Duration,
    address: Option<String>,
) -> Result<String> {
    invite_at(library, access, ttl, address.into_iter().collect()).await
}

/// `invite` with any number of addresses (each may be a comma-separated list), tried by
/// the new device in this order; none: those of every `serve` process running for the
/// library now, else where `serve` last listened.
pub async fn invite_at(
    library: &Library,
    access: Access,
    ttl: Duration,
    addresses: Vec<String>,
) -> Result<String> {
    let mut addresses: Vec<String> = addresses.iter().flat_map(|a| split_addresses(a)).collect();
    if addresses.is_empty() {
        addresses = serving_addresses(library).await?;
    }
    if addresses.is_empty() {
        addresses.extend(library.local_setting(SERVE_ADDRESS).await?);
    }
    if addresses.is_empty() {
        bail!(
            "no address to advertise: run `serve --listen HOST:PORT` first, or pass `--address HOST:PORT`"
        );
    }
    let invite = library.leader()?.invite(access, ttl).await?;
    let key = library.device_key().await?;
    Ok(JoinToken::for_addresses(&invite, &addresses, key.fingerprint()).encode())
}

/// Sets up the database at `url` (which must hold no library yet, or one whose join was
/// interrupted) as a follower of the library `token` invites to. Everything the join
/// stores — the library, this device's membership, the leader's address and pinned key —
/// commits in one transaction.
pub async fn join(url: &str, token: &str, name: Option<&str>) -> Result<Library> {
    let token = JoinToken::decode(token)?;
    let db = connect(url).await?;
    Migrator::up(&db, None)
        .await
        .context("cannot create the schema")?;
    match Library::open_default(db.clone(), registry()).await {
        // An earlier build stored the leader's key after the library, in a transaction
        // of its own: a join killed in between left a follower that cannot follow. It may
        // join again (with a new invite: the first one was redeemed).
        Ok(library)
            if library.role() == Role::Follower
                && library.local_setting(LEADER_KEY).await?.is_none() =>
        {
            tracing::warn!(
                library = %library.id(),
                "this database holds a join that was interrupted; joining again"
            );
        }
        Ok(library) => bail!(
            "{url} already holds library {}; join with a fresh database",
            library.id()
        ),
        Err(OpenError::NoLibrary) => {}
        Err(e) => return Err(e.into()),
    }
    let key = sync_core::Library::device_key_of(&db).await?;
    let client = Client::new(key, ClientConfig::default());
    let joined = client.join(&token, name).await?;
    let library = Library::join_with_settings(
        db,
        joined.library_id,
        joined.leader_device_id,
        &joined.library_name,
        joined.access,
        &[
            (LEADER_ADDRESS, token.addresses().join(",").as_str()),
            (LEADER_KEY, token.leader_key.as_str()),
        ],
        registry(),
    )
    .await?;
    Ok(library)
}

/// A QUIC transport to `library`'s leader, from what `join` stored. `leader` (one address,
/// or several separated by commas) replaces the stored addresses (the leader moved); the
/// key stays pinned.
pub async fn transport(library: &Library, leader: Option<&str>) -> Result<Arc<QuicTransport>> {
    if library.role() != Role::Follower {
        bail!(
            "this device leads library {}; followers `follow`, the leader `serve`s",
            library.id()
        );
    }
    if let Some(address) = leader {
        library.set_local_setting(LEADER_ADDRESS, address).await?;
    }
    // The leader as the replicated membership knows it: after a handoff its key and
    // addresses came with the move record (a device that led never stored a leader's).
    let current = library
        .members()
        .await?
        .into_iter()
        .find(|m| m.device_id == library.leader_device_id());
    let stored_pin: Option<KeyFingerprint> = library
        .local_setting(LEADER_KEY)
        .await?
        .map(|text| text.parse())
        .transpose()
        .context("the stored leader key is damaged; join again")?;
    let moved = stored_pin.is_none_or(|pin| pin.device_id() != library.leader_device_id());
    let stored_addresses = library
        .local_setting(LEADER_ADDRESS)
        .await?
        .map(|text| split_addresses(&text))
        .filter(|addresses| !addresses.is_empty());
    let member_addresses = current
        .as_ref()
        .map(|m| m.addresses.clone())
        .filter(|addresses| !addresses.is_empty());
    let addresses = match (leader, moved) {
        (Some(_), _) | (None, false) => stored_addresses.or(member_addresses),
        (None, true) => member_addresses.or(stored_addresses),
    }
    .ok_or_else(|| anyhow!("no leader address known: pass `--leader HOST:PORT`"))?;
    let pin = match (moved, current.and_then(|m| m.key)) {
        (true, Some(key)) => key,
        _ => stored_pin.ok_or_else(|| {
            anyhow!(
                "no leader key known: this database did not `join`, and the membership holds none"
            )
        })?,
    };
    let key = library.device_key().await?;
    let client = Client::new(key, ClientConfig::default());
    Ok(Arc::new(QuicTransport::with_addresses(
        client,
        addresses,
        pin,
        library.id(),
    )))
}

/// Pulls until the follower has the leader's latest seq as of the first answer, calling
/// `progress(position, target)` after each batch. Records the outcome for `status`.
pub async fn sync_once(
    library: &Library,
    transport: &QuicTransport,
    mut progress: impl FnMut(u64, u64),
) -> Result<Position> {
    let outcome = async {
        // `sync_round` pushes this device's own writes first, so the pull brings back how
        // the leader took them; a failed push still lets the pull run.
        let round = library
            .follower()?
            .sync_round(transport, 1_000, |applied, target| {
                progress(applied.position.seq.0, target.0);
            })
            .await;
        if !matches!(round, Err(SyncError::Pull(_) | SyncError::Apply(_))) {
            // The pull went through (the push may have failed).
            library
                .set_local_setting(LEADER_LATEST, &transport.leader_latest_seq().0.to_string())
                .await?;
        }
        match round {
            Ok((position, _)) => Ok::<_, anyhow::Error>(position),
            Err(e @ SyncError::Push(_)) => Err(anyhow::Error::new(e)
                .context("pushing this device's changes failed; they stay in its outbox")),
            Err(e) => Err(e.into()),
        }
    }
    .await;
    let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
    library
        .set_local_setting(LAST_ERROR, error.as_deref().unwrap_or(""))
        .await?;
    outcome
}

/// What `status --json` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AppStatus {
    /// Leader or follower.
    pub role: Role,
    /// The library.
    pub library_id: sync_core::LibraryId,
    /// This device.
    pub device_id: sync_core::DeviceId,
    /// This device's access.
    pub access: Access,
    /// Leader: its log's latest seq. Follower: the leader's, as of the last sync.
    pub latest_seq: u64,
    /// Follower: how far it has applied.
    pub position: Option<u64>,
    /// Follower: `latest_seq - position`.
    pub lag: Option<u64>,
    /// Leader: its devices and where each last pulled from.
    pub followers: Option<Vec<sync_core::Member>>,
    /// Follower: the last sync error, if the last sync failed.
    pub last_error: Option<String>,
    /// Follower: its own changes waiting to be pushed to the leader.
    pub outbox: u64,
    /// Open conflicts (they replicate: every device shows the same count once in sync).
    pub conflicts: u64,
    /// Changes the leader could not store, set aside (leader: every device's; follower:
    /// its own). `rejected` lists them.
    pub rejected: u64,
    /// Follower: pulled entries set aside by `skip` (and later entries of their records).
    pub parked: u64,
    /// The library's leadership epoch, as this device knows it.
    pub epoch: u64,
    /// The leader, as this device knows it.
    pub leader_device_id: sync_core::DeviceId,
    /// Where the leader listens, as far as this device knows.
    pub leader_address: Option<String>,
}

/// This device's status in its library.
pub async fn status(library: &Library) -> Result<AppStatus> {
    let access = library.access().await?;
    let leadership = library.leadership();
    let leader_address = match library.role() {
        Role::Leader => library.local_setting(SERVE_ADDRESS).await?,
        Role::Follower => {
            let from_members = library
                .members()
                .await?
                .into_iter()
                .find(|m| m.device_id == leadership.leader)
                .map(|m| m.addresses.join(","))
                .filter(|a| !a.is_empty());
            match from_members {
                Some(addresses) => Some(addresses),
                None => library.local_setting(LEADER_ADDRESS).await?,
            }
        }
    };
    let mut status = match library.role() {
        Role::Leader => AppStatus {
            role: Role::Leader,
            library_id: library.id(),
            device_id: library.device_id(),
            access,
            latest_seq: library.latest_seq().await?.0,
            position: None,
            lag: None,
            followers: Some(
                library
                    .members()
                    .await?
                    .into_iter()
                    .filter(|m| m.access != Access::Leader)
                    .collect(),
            ),
            last_error: None,
            outbox: 0,
            conflicts: library.conflict_count().await?,
            rejected: library.rejected_count().await?,
            parked: 0,
            epoch: 0,
            leader_device_id: library.device_id(),
            leader_address: None,
        },
        Role::Follower => {
            let position = library.position().await?.seq.0;
            let latest = match library.local_setting(LEADER_LATEST).await? {
                Some(text) => text.parse().unwrap_or(position),
                None => position,
            }
            .max(position);
            let last_error = library
                .local_setting(LAST_ERROR)
                .await?
                .filter(|e| !e.is_empty());
            AppStatus {
                role: Role::Follower,
                library_id: library.id(),
                device_id: library.device_id(),
                access,
                latest_seq: latest,
                position: Some(position),
                lag: Some(latest - position),
                followers: None,
                last_error,
                outbox: library.outbox_len().await?,
                conflicts: library.conflict_count().await?,
                rejected: library.rejected_count().await?,
                parked: library.parked_count().await?,
                epoch: 0,
                leader_device_id: library.device_id(),
                leader_address: None,
            }
        }
    };
    status.epoch = leadership.epoch.0;
    status.leader_device_id = leadership.leader;
    status.leader_address = leader_address;
    Ok(status)
}

/// `status` for people.
pub fn describe(status: &AppStatus) -> String {
    let leadership = format!(
        "; epoch {}, leader {}{}",
        status.epoch,
        status.leader_device_id,
        status
            .leader_address
            .as_ref()
            .map_or_else(String::new, |a| format!(" at {a}"))
    );
    let described = match status.role {
        Role::Leader => format!(
            "leader of library {} (device {}), latest seq {}, {} follower(s), {} open conflict(s), {} rejected change(s)",
            status.library_id,
            status.device_id,
            status.latest_seq,
            status.followers.as_ref().map_or(0, Vec::len),
            status.conflicts,
            status.rejected
        ),
        Role::Follower => format!(
            "follower ({} access) of library {} (device {}), at seq {} of {}, {} change(s) to push, {} open conflict(s), {} rejected change(s), {} parked entr(ies){}",
            status.access,
            status.library_id,
            status.device_id,
            status.position.unwrap_or_default(),
            status.latest_seq,
            status.outbox,
            status.conflicts,
            status.rejected,
            status.parked,
            status
                .last_error
                .as_ref()
                .map_or_else(String::new, |e| format!("; last error: {e}"))
        ),
    };
    described + &leadership
}

/// Stores what the live follow loop last knew, for `status`.
pub async fn record_follow_status(
    library: &Library,
    status: &sync_core::FollowStatus,
) -> Result<()> {
    library
        .set_local_setting(LEADER_LATEST, &status.latest_seq.0.to_string())
        .await?;
    library
        .set_local_setting(LAST_ERROR, status.last_error.as_deref().unwrap_or(""))
        .await?;
    Ok(())
}
