//! The follower's pull loop: one background task per followed library that owns its state
//! behind a command channel. Apps start it, stop it, read its status and subscribe to
//! "changes applied" events.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

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
    /// This follower's own changes waiting to be pushed, as of the last round.
    pub outbox: u64,
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
    pub fn start_following(&self, transport: Arc<dyn Transport>, config: FollowConfig) -> Follow {
        let (commands, receiver) = mpsc::channel(COMMANDS_MAX);
        let (status_tx, status) = watch::channel(FollowStatus::default());
        let (events, _) = broadcast::channel(EVENTS_MAX);
        let state = LoopState {
            library: self.clone(),
            transport,
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
    config: FollowConfig,
    status: watch::Sender<FollowStatus>,
    events: broadcast::Sender<ChangesApplied>,
}

impl LoopState {
    async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let mut failures: u32 = 0;
        let mut outbox = self.library.watch_outbox();
        loop {
            outbox.mark_unchanged();
            match self.round().await {
                Ok(()) => failures = 0,
                Err(message) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(library = %self.library.id(), %message, "pull failed; retrying");
                    self.status.send_modify(|s| s.last_error = Some(message));
                }
            }
            // Decided after the pull: a failure retries soon, not a poll interval later.
            let delay = if failures == 0 {
                self.config.poll_interval
            } else {
                let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
                let delay = self
                    .config
                    .retry_delay_min
                    .saturating_mul(factor)
                    .min(self.config.retry_delay_max);
                // Jitter: followers that lost one leader together do not all come back
                // in the same instant.
                delay.mul_f64(rand::random_range(0.5..1.0))
            };
            let next = tokio::select! {
                command = commands.recv() => command,
                () = tokio::time::sleep(delay) => Some(Command::SyncNow),
                // The leader announced news: pull at once (unless backing off).
                () = self.transport.news(), if failures == 0 => Some(Command::SyncNow),
                // A local write entered the outbox: push it.
                Ok(()) = outbox.changed(), if failures == 0 => Some(Command::SyncNow),
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

    /// One round: push this follower's own changes first (so that the pull brings back
    /// how the leader sequenced them), then pull until caught up.
    async fn round(&self) -> Result<(), String> {
        // A push that fails (the leader away, or a change it refuses) must not stop the
        // pulls: the follower keeps receiving the library while its own changes wait.
        let pushed = if self.library.is_read_only() {
            Ok(())
        } else {
            match self.library.push_outbox(self.transport.as_ref()).await {
                Ok(pushed) => {
                    tracing::debug!(library = %self.library.id(), ?pushed, "pushed");
                    Ok(())
                }
                Err(e) => Err(format!("push: {e}")),
            }
        };
        let pulled = self.pull_until_caught_up().await;
        let outbox = self.library.outbox_len().await.unwrap_or(0);
        self.status.send_modify(|s| s.outbox = outbox);
        pulled.and(pushed)
    }

    async fn pull_until_caught_up(&self) -> Result<(), String> {
        let mut previous = None;
        loop {
            let (applied, latest) = self
                .library
                .pull_once(self.transport.as_ref(), self.config.batch_len_max)
                .await
                .map_err(|e| e.to_string())?;
            let position = applied.position.seq;
            tracing::debug!(library = %self.library.id(), %position, %latest, "pulled");
            self.status.send_modify(|s| {
                s.position = position;
                s.latest_seq = latest;
                s.lag = latest.0.saturating_sub(position.0);
                s.last_error = None;
            });
            if !applied.records.is_empty() {
                // No subscribers is fine.
                let _ = self.events.send(ChangesApplied {
                    records: applied.records,
                    position,
                });
            }
            if position >= latest {
                return Ok(());
            }
            if previous == Some(position) {
                return Err(format!(
                    "the leader reports seq {latest} but sent nothing after {position}"
                ));
            }
            previous = Some(position);
        }
    }
}
