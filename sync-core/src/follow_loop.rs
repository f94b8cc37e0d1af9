//! The follower's pull loop: one background task per followed library that owns its state
//! behind a command channel. Apps start it, stop it, read its status and subscribe to
//! "changes applied" events.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::decide::follow::Backoff;
use crate::follower::{ApplyError, SyncError};
use crate::protocol::{PullError, PushError, Refused};
use crate::{Library, Seq, Transport};

/// Commands waiting for the loop: a few, since each one only nudges it.
const COMMANDS_MAX: usize = 8;

/// "Changes applied" events kept for slow subscribers before they miss some (they are
/// told how many with `RecvError::Lagged`, and can reread the data).
const EVENTS_MAX: usize = 1_024;

/// How the loop pulls.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// Entries per pull.
    pub batch_len_max: u32,
    /// How often to pull when nothing asks for it sooner (the fallback to live notices).
    pub poll_interval: Duration,
    /// The first retry delay after an error; doubled per failure up to `retry_delay_max`.
    pub retry_delay_min: Duration,
    /// The longest retry delay.
    pub retry_delay_max: Duration,
}

impl Default for FollowConfig {
    fn default() -> Self {
        FollowConfig {
            batch_len_max: 1_000,
            poll_interval: Duration::from_secs(5),
            retry_delay_min: Duration::from_millis(100),
            retry_delay_max: Duration::from_secs(30),
        }
    }
}

/// What the loop last knew.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FollowStatus {
    /// The follower's position.
    pub position: Seq,
    /// The leader's latest seq, as of the last answer.
    pub latest_seq: Seq,
    /// `latest_seq - position`.
    pub lag: u64,
    /// The last error, cleared by the next successful round.
    pub last_error: Option<String>,
    /// What the loop is doing, as data: in sync, offline, revoked, refused, stuck.
    pub state: FollowState,
    /// Whether the loop goes on on its own (polls, retries): false after a revocation or
    /// a refusal of its pulls, until the app calls `Follow::sync_now`.
    pub retrying: bool,
    /// This follower's own changes waiting to be pushed, as of the last round.
    pub outbox: u64,
    /// Pulled entries parked on this device (`Library::parked`), as of the last round:
    /// until they are retried or dropped, this device's copy of their records differs.
    pub parked: u64,
    /// This device's changes the leader could not store, set aside
    /// (`Library::rejected`), as of the last round.
    pub rejected: u64,
}

/// What the follow loop is doing, as data an app can match on. Whether it retries follows
/// from it: the network and the database may recover, a revocation or a refusal does not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FollowState {
    /// No round has finished yet.
    #[default]
    Starting,
    /// The last round pushed the outbox and reached the leader's latest seq.
    InSync,
    /// The leader cannot be reached (down, or the network): retried with backoff.
    Offline {
        /// What failed.
        reason: String,
    },
    /// The leader revoked this device: not retried; joining again needs a new invite.
    Revoked {
        /// The leader's words.
        reason: String,
    },
    /// The leader refused this device, or the two sides cannot understand each other:
    /// not retried until the app asks (`Follow::sync_now`), after fixing the cause.
    Refused {
        /// Why.
        why: RefusedFor,
        /// The error, in words.
        reason: String,
    },
    /// A pulled entry cannot be stored on this device: retried with backoff (a fix of the
    /// cause, or `FollowerView::park(seq)`, gets past it).
    Stuck {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
        /// Its record.
        record_id: String,
        /// What the database said.
        reason: String,
    },
    /// Another failure (this device's database, a damaged answer): retried with backoff.
    Failing {
        /// The error, in words.
        reason: String,
    },
    /// This device leads the library now (a handoff named it, and it has taken the log
    /// over): there is no one to follow; the loop idles until stopped.
    Leading,
}

/// Why a leader and this follower cannot sync, in a way retrying cannot fix.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusedFor {
    /// The two apps speak different sync protocol versions: update the older one.
    ProtocolVersion,
    /// A model is unknown to one side or has another schema version: update the older app.
    SchemaVersion,
    /// This device is not a member of the library.
    NotMember,
    /// This device has read access and may not push.
    ReadOnly,
    /// The device at the leader's address is not the pinned leader.
    WrongLeader,
    /// The leader does not lead this library.
    UnknownLibrary,
    /// The leader's log is not this follower's history (a leader restored from an older
    /// copy, say).
    HistoryDiverged,
    /// The device answering is a leader of an older epoch than this follower knows (it has
    /// been replaced): nothing it sends is used.
    StaleEpoch,
    /// The device asked no longer leads the library: a newer epoch exists.
    Superseded,
    /// Leadership moved to another device: follow it (its id and addresses are in the
    /// reason; `Library::leadership` names it).
    Moved,
    /// The log holds a leadership move this device cannot trust (a signature, a signer, or
    /// its place in the chain is wrong): it keeps the leader it knows.
    UntrustedMove,
}

impl FollowState {
    /// The state a failed round leaves the loop in.
    pub fn of(error: &SyncError) -> FollowState {
        let reason = error.to_string();
        let refused = |why| FollowState::Refused {
            why,
            reason: reason.clone(),
        };
        let by_kind = |kind: Refused| match kind {
            Refused::Revoked => FollowState::Revoked {
                reason: reason.clone(),
            },
            Refused::NotMember => refused(RefusedFor::NotMember),
            Refused::ReadOnly => refused(RefusedFor::ReadOnly),
            Refused::WrongLeader => refused(RefusedFor::WrongLeader),
            Refused::UnknownLibrary => refused(RefusedFor::UnknownLibrary),
            Refused::SchemaVersion => refused(RefusedFor::SchemaVersion),
            Refused::StaleEpoch => refused(RefusedFor::StaleEpoch),
            Refused::Superseded => refused(RefusedFor::Superseded),
            _ => refused(RefusedFor::ProtocolVersion),
        };
        match error {
            SyncError::Pull(e) => match e {
                PullError::Transport(_) => FollowState::Offline { reason },
                PullError::Refused { kind, .. } => by_kind(*kind),
                PullError::VersionMismatch { .. } => refused(RefusedFor::ProtocolVersion),
                PullError::NotLeader(_) => refused(RefusedFor::UnknownLibrary),
                PullError::HistoryDiverged(_) => refused(RefusedFor::HistoryDiverged),
                PullError::StaleEpoch { .. } => refused(RefusedFor::StaleEpoch),
                PullError::Superseded { .. } => refused(RefusedFor::Superseded),
                PullError::Moved { .. } => refused(RefusedFor::Moved),
                _ => FollowState::Failing { reason },
            },
            SyncError::Apply(e) => match e {
                ApplyError::VersionMismatch { .. } => refused(RefusedFor::ProtocolVersion),
                ApplyError::UnknownModel { .. } | ApplyError::SchemaMismatch { .. } => {
                    refused(RefusedFor::SchemaVersion)
                }
                ApplyError::WrongLibrary { .. } => refused(RefusedFor::UnknownLibrary),
                ApplyError::Chain(crate::ChainError::Mismatch { .. }) => {
                    refused(RefusedFor::HistoryDiverged)
                }
                ApplyError::BadMove { .. } => refused(RefusedFor::UntrustedMove),
                ApplyError::Stuck {
                    seq,
                    model,
                    record_id,
                    reason: why,
                } => FollowState::Stuck {
                    seq: *seq,
                    model: model.clone(),
                    record_id: record_id.clone(),
                    reason: why.clone(),
                },
                _ => FollowState::Failing { reason },
            },
            SyncError::Push(e) => match e {
                PushError::Transport(_) => FollowState::Offline { reason },
                PushError::Refused { kind, .. } => by_kind(*kind),
                PushError::VersionMismatch { .. } => refused(RefusedFor::ProtocolVersion),
                PushError::NotLeader(_) => refused(RefusedFor::UnknownLibrary),
                PushError::StaleEpoch { .. } => refused(RefusedFor::StaleEpoch),
                PushError::Superseded { .. } => refused(RefusedFor::Superseded),
                PushError::Moved { .. } => refused(RefusedFor::Moved),
                // A handoff under way: retried with backoff.
                PushError::Moving { .. } => FollowState::Offline { reason },
                PushError::NotWriter { reason: why, .. } if why.contains("revoked") => {
                    FollowState::Revoked { reason }
                }
                PushError::NotWriter { reason: why, .. } if why.contains("read access") => {
                    refused(RefusedFor::ReadOnly)
                }
                PushError::NotWriter { .. } => refused(RefusedFor::NotMember),
                // A change of a model the leader does not know, or of another schema
                // version (other bad changes are set aside, not refused).
                PushError::BadChange { .. } => refused(RefusedFor::SchemaVersion),
                _ => FollowState::Failing { reason },
            },
        }
    }

    /// Whether retrying can fix this: not a revocation or a refusal. (When only pushes are
    /// refused the loop still pulls; `FollowStatus::retrying` says what it does.)
    pub fn retries(&self) -> bool {
        !matches!(
            self,
            FollowState::Revoked { .. } | FollowState::Refused { .. }
        )
    }
}

/// Records a pull applied, for UIs that refresh what they show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangesApplied {
    /// `(model, record_id)` of each applied entry, in log order.
    pub records: Vec<(String, String)>,
    /// The position after them.
    pub position: Seq,
}

enum Command {
    SyncNow,
    Stop(oneshot::Sender<()>),
}

/// A running pull loop. Dropping it stops the loop too.
#[derive(Debug)]
pub struct Follow {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<FollowStatus>,
    events: broadcast::Sender<ChangesApplied>,
}

impl Library {
    /// Starts this follower's pull loop over `transport`.
    pub(crate) fn start_following(
        &self,
        transport: Arc<dyn Transport>,
        config: FollowConfig,
    ) -> Follow {
        let (commands, receiver) = mpsc::channel(COMMANDS_MAX);
        let (status_tx, status) = watch::channel(FollowStatus::default());
        let (events, _) = broadcast::channel(EVENTS_MAX);
        let state = LoopState {
            library: self.clone(),
            transport,
            followed: std::sync::Mutex::new(self.leader_device_id()),
            config,
            status: status_tx,
            events: events.clone(),
        };
        tokio::spawn(state.run(receiver));
        Follow {
            commands,
            status,
            events,
        }
    }
}

impl Follow {
    /// The loop's latest status.
    pub fn status(&self) -> FollowStatus {
        self.status.borrow().clone()
    }

    /// The loop's status as it changes (a watch: a reader that falls behind sees the
    /// latest status, not each one in between).
    pub fn watch_status(&self) -> watch::Receiver<FollowStatus> {
        self.status.clone()
    }

    /// A stream of "changes applied" events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangesApplied> {
        self.events.subscribe()
    }

    /// Waits until the status satisfies `done` (e.g. a position reached), or `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&FollowStatus) -> bool,
    ) -> Option<FollowStatus> {
        let mut status = self.status.clone();
        tokio::time::timeout(timeout, async move {
            loop {
                {
                    let now = status.borrow_and_update();
                    if done(&now) {
                        return Some(now.clone());
                    }
                }
                if status.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Asks the loop to pull now (a leader's live notice calls this).
    pub fn sync_now(&self) {
        // Full means pulls are already due.
        let _ = self.commands.try_send(Command::SyncNow);
    }

    /// Stops the loop and waits until it has (a pull in progress finishes first: a batch is
    /// applied whole or not at all).
    pub async fn stop(self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

struct LoopState {
    library: Library,
    transport: Arc<dyn Transport>,
    /// The leader the transport points at.
    followed: std::sync::Mutex<crate::DeviceId>,
    config: FollowConfig,
    status: watch::Sender<FollowStatus>,
    events: broadcast::Sender<ChangesApplied>,
}

impl LoopState {
    async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let mut backoff = Backoff::new(&self.config);
        let mut outbox = self.library.watch_outbox();
        loop {
            outbox.mark_unchanged();
            let outcome = match self.round().await {
                Ok(()) => {
                    let leads = self.leads();
                    self.status.send_modify(|s| {
                        s.state = if leads {
                            FollowState::Leading
                        } else {
                            FollowState::InSync
                        };
                        s.retrying = true;
                    });
                    Ok(())
                }
                Err(error) => {
                    crate::metrics::record_follow_error(self.library.id());
                    let state = FollowState::of(&error);
                    // A refused push does not stop the pulls: the follower keeps receiving
                    // the library (and tries the push again) while its own changes wait.
                    let retries = state.retries() || matches!(error, SyncError::Push(_));
                    let message = match &error {
                        SyncError::Push(e) => format!("push: {e}"),
                        other => other.to_string(),
                    };
                    if retries {
                        tracing::warn!(library = %self.library.id(), %message, "sync failed; retrying");
                    } else {
                        tracing::error!(
                            library = %self.library.id(),
                            %message,
                            "sync refused; not retrying until asked (`Follow::sync_now`)"
                        );
                    }
                    self.status.send_modify(|s| {
                        s.last_error = Some(message);
                        s.state = state;
                        s.retrying = retries;
                    });
                    Err(retries)
                }
            };
            // Decided after the pull: a failure retries soon, not a poll interval later.
            let now = tokio::time::Instant::now();
            let wake = backoff.round_ended(outcome, now.into_std(), rand::random_range(0.5..1.0));
            let retries = wake.at.is_some();
            let at = wake.at.map_or(now, tokio::time::Instant::from_std);
            let next = tokio::select! {
                command = commands.recv() => command,
                () = tokio::time::sleep_until(at), if retries => Some(Command::SyncNow),
                // The leader announced news: pull at once (unless backing off).
                () = self.transport.news(), if wake.on_news => Some(Command::SyncNow),
                // A local write entered the outbox: push it.
                Ok(()) = outbox.changed(), if wake.on_news => Some(Command::SyncNow),
            };
            match next {
                Some(Command::SyncNow) => {}
                Some(Command::Stop(done)) => {
                    let _ = done.send(());
                    return;
                }
                // Every `Follow` handle is gone.
                None => return,
            }
        }
    }

    /// One round (`Library::sync_round`: push this follower's own changes, then pull
    /// until caught up), then the counts the status shows.
    async fn round(&self) -> Result<(), SyncError> {
        if self.leads() {
            return Ok(());
        }
        self.follow_the_leader(None).await;
        let mut round = self.sync_round().await;
        // A move learnt in this round (the record applied, or a `Moved` answer): point the
        // transport at the new leader and go on there at once.
        let hint = match &round {
            Err(SyncError::Pull(PullError::Moved {
                leader, addresses, ..
            })) => Some((*leader, addresses.clone())),
            Err(SyncError::Push(PushError::Moved { leader, .. })) => Some((*leader, Vec::new())),
            _ => None,
        };
        let moved = hint.is_some() || self.library.leader_device_id() != self.followed();
        if moved && !self.leads() && self.follow_the_leader(hint).await {
            round = self.sync_round().await;
        }
        if let Ok((position, latest)) = &round {
            // Also when nothing was applied: the status shows the leader's latest seq.
            self.status.send_modify(|s| {
                s.position = position.seq;
                s.latest_seq = *latest;
                s.lag = latest.0.saturating_sub(position.seq.0);
                s.last_error = None;
            });
        }
        // A count that fails keeps the status and the gauges at their last true values.
        let id = self.library.id();
        let counts = (
            self.library.outbox_len().await,
            self.library.parked_count().await,
            self.library.rejected_count().await,
        );
        if let (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) = &counts {
            tracing::warn!(library = %id, %e, "cannot count the outbox, parked or rejected changes");
        }
        let (outbox, parked, rejected) = (counts.0.ok(), counts.1.ok(), counts.2.ok());
        if let Some(outbox) = outbox {
            crate::metrics::record_outbox(id, outbox);
        }
        if let Some(parked) = parked {
            crate::metrics::record_parked(id, parked);
        }
        self.status.send_modify(|s| {
            s.outbox = outbox.unwrap_or(s.outbox);
            s.parked = parked.unwrap_or(s.parked);
            s.rejected = rejected.unwrap_or(s.rejected);
        });
        round.map(|_| ())
    }

    async fn sync_round(&self) -> Result<(crate::Position, Seq), SyncError> {
        self.library
            .sync_round(
                self.transport.as_ref(),
                self.config.batch_len_max,
                |applied, latest| self.pulled(applied, latest),
            )
            .await
    }

    /// Whether this device leads the library now (and has taken the log over).
    fn leads(&self) -> bool {
        let leadership = self.library.leadership();
        leadership.leader == self.library.device_id() && !leadership.taking_over
    }

    fn followed(&self) -> crate::DeviceId {
        *self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Points the transport at the leader this device knows now (or the one a `Moved`
    /// answer named, `hint`, with its addresses), if it is not the one followed: its key
    /// from the replicated membership, its addresses from the answer and the membership.
    /// Returns whether the transport was pointed somewhere new.
    async fn follow_the_leader(&self, hint: Option<(crate::DeviceId, Vec<String>)>) -> bool {
        let leadership = self.library.leadership();
        let (leader, mut addresses) = hint.unwrap_or((leadership.leader, Vec::new()));
        if leader == self.followed() || leader == self.library.device_id() {
            return false;
        }
        let member = match self.library.members().await {
            Ok(members) => members.into_iter().find(|m| m.device_id == leader),
            Err(e) => {
                tracing::warn!(library = %self.library.id(), %e, "cannot read the membership to follow the new leader");
                return false;
            }
        };
        let Some(key) = member.as_ref().and_then(|m| m.key) else {
            tracing::warn!(
                library = %self.library.id(),
                %leader,
                "the leader moved to a device whose key the membership does not hold; \
                 cannot follow it without a new invite"
            );
            return false;
        };
        for address in member.map(|m| m.addresses).unwrap_or_default() {
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        let moved = crate::LeaderMoved {
            library_id: self.library.id(),
            epoch: leadership.epoch,
            leader,
            key,
            addresses,
        };
        if !self.transport.leader_moved(&moved).await {
            return false;
        }
        tracing::info!(
            library = %self.library.id(),
            %leader,
            epoch = %moved.epoch,
            addresses = ?moved.addresses,
            "the leader moved: following it"
        );
        *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = leader;
        true
    }

    /// After each transaction of a round: the status moves, listeners hear what changed.
    fn pulled(&self, applied: &crate::Applied, latest: Seq) {
        let position = applied.position.seq;
        tracing::debug!(library = %self.library.id(), %position, %latest, "pulled");
        self.status.send_modify(|s| {
            s.position = position;
            s.latest_seq = latest;
            s.lag = latest.0.saturating_sub(position.0);
        });
        if !applied.records.is_empty() {
            // No subscribers is fine.
            let _ = self.events.send(ChangesApplied {
                records: applied.records.clone(),
                position,
            });
        }
    }
}
