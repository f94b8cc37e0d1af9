//! A seeded simulation of a library: a leader, two write followers and a read follower
//! (more join during the run), each on its own SQLite database, running the real library
//! over a simulated network that drops requests, loses answers, sends pushes twice,
//! holds requests and answers back to deliver them later (after others: reordering), and
//! cuts followers off for stretches of steps (partitions). Devices crash (their handles and
//! connections are dropped; the database keeps what was committed) and restart; every
//! device's clock is simulated, with skew (one device may run far ahead). The workload
//! writes on every device that may, over records of every merge rule (`models.rs` adds the
//! two the example app has no model for), resolves conflicts, joins new followers and
//! revokes one. After the random steps the network heals, every device still a member
//! syncs until quiet, and the run checks the library against a plain in-memory reference
//! model of what every write implies (`reference.rs`). One seed is one run:
//! `SYNC_SIM_SEED=<seed>` replays it.
//!
//! It drives the library's async shells step by step (each step completes before the next
//! starts), not a core without I/O. What it does not model is listed in ARCHITECTURE.md
//! (*Simulation*).

pub mod models;
mod reference;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait, IntoActiveModel};
use sea_orm_migration::MigratorTrait;
use sync_core::{
    Access, Admission, DeviceId, InProcess, Library, LibraryId, PullError, PullRequest,
    PullResponse, PushError, PushRequest, PushResponse, Refused, Resolution, Seq, Transport,
};
use tokio::sync::Mutex;

use reference::{Check, Reference, Write};

/// Steps per run unless asked otherwise.
pub const STEPS: usize = 120;

/// Records per model: few, so that devices often edit the same ones.
const RECORDS: usize = 3;

/// The simulated epoch every clock starts from (2027-01-15), in milliseconds.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// Sync rounds after the steps before the run must be quiet.
const HEAL_ROUNDS_MAX: usize = 16;

/// Followers that may join during a run.
const JOINS_MAX: usize = 2;

/// What one run did, for the summary.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Writes made (committed) on any device.
    pub writes: u64,
    /// Crashes.
    pub crashes: u64,
    /// Requests dropped, answers lost, pushes sent twice, messages held back.
    pub faults: u64,
    /// Entries in the leader's log at the end.
    pub log_len: u64,
    /// Conflicts resolved during the run and at its end.
    pub resolved: u64,
    /// Conflicts open at the end (listed by `Library::conflicts`).
    pub open_conflicts: u64,
    /// Followers that joined during the run.
    pub joined: u64,
    /// Followers revoked during the run.
    pub revoked: u64,
    /// Held-back messages delivered late.
    pub delivered_late: u64,
    /// Changes of a revoked follower left in its outbox at the end.
    pub unpushed_of_revoked: u64,
}

/// A migrated, empty SQLite database file to copy for each device (migrating is most of
/// a run's cost otherwise).
pub async fn template(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("template.db");
    let db = connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
    models::Migrator::up(&db, None).await?;
    db.close().await?;
    Ok(path)
}

/// Opens a device's SQLite database as the example app does (WAL), but with
/// `synchronous=OFF`: a commit is not flushed to the disk. That keeps the simulation's
/// crash honest because a crash here drops the device's handles and connections (the
/// process, not the machine, dies): what was committed is in the OS page cache and stays.
/// The simulator never models losing the page cache (a power cut).
async fn connect(url: &str) -> Result<sea_orm::DatabaseConnection> {
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(std::time::Duration::from_secs(5))
        .acquire_timeout(std::time::Duration::from_secs(10))
        .max_connections(8);
    options.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Off)
            .busy_timeout(std::time::Duration::from_secs(10))
    });
    sea_orm::Database::connect(options)
        .await
        .with_context(|| format!("cannot open database {url}"))
}

fn registry() -> Result<sync_core::Registry> {
    models::registry().map_err(|e| anyhow!("the simulator's registry: {e}"))
}

struct Device {
    name: String,
    url: String,
    library: Option<Library>,
    /// Added to the simulated time: this device's clock skew.
    skew_ms: i64,
    access: Access,
    id: DeviceId,
    /// Revoked by the leader: no longer served, left out of convergence.
    revoked: bool,
    /// Cut off from the leader until this step.
    partitioned_until: usize,
}

/// A message held back by the network, delivered later (or never).
enum Held {
    /// A push request not yet delivered to the leader; its author saw it fail.
    Push(PushRequest),
    /// A pull answer not yet delivered to the follower `device`, which asked from `after`.
    Pull {
        device: usize,
        after: Seq,
        response: PullResponse,
    },
}

/// The leader as followers reach it: through faults, and not at all while it is down.
struct Network {
    leader: Mutex<Option<Library>>,
    held: Mutex<Vec<Held>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Cut off: nothing reaches the leader.
    Partitioned,
    /// The request is lost.
    Drop,
    /// The leader acts, the answer is lost.
    LoseAnswer,
    /// A push arrives twice.
    Duplicate,
    /// The request (push) or the answer (pull) is held back, to arrive later.
    Hold,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "no fault",
            Fault::Partitioned => "partitioned",
            Fault::Drop => "request dropped",
            Fault::LoseAnswer => "answer lost",
            Fault::Duplicate => "pushed twice",
            Fault::Hold => "held back",
        }
    }
}

struct SimTransport {
    network: Arc<Network>,
    device: usize,
    device_id: DeviceId,
    fault: Fault,
}

impl SimTransport {
    async fn leader(&self) -> Option<InProcess> {
        self.network
            .leader
            .lock()
            .await
            .clone()
            .and_then(|l| l.leader().ok().map(InProcess::new))
    }
}

#[async_trait::async_trait]
impl Transport for SimTransport {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        if self.fault == Fault::Partitioned {
            return Err(PullError::Transport("partitioned".into()));
        }
        let Some(leader_library) = self.network.leader.lock().await.clone() else {
            return Err(PullError::Transport("the leader is down".into()));
        };
        // What an authenticated transport does before serving a pull (sync-transport's
        // server): a device that is not a member, or was revoked, is refused.
        match leader_library.admission(self.device_id).await {
            Ok(Admission::Member(_)) => {}
            Ok(Admission::Revoked(_)) => {
                return Err(PullError::Refused {
                    kind: Refused::Revoked,
                    message: "revoked".into(),
                });
            }
            Ok(Admission::NotMember) => {
                return Err(PullError::Refused {
                    kind: Refused::NotMember,
                    message: "not a member".into(),
                });
            }
            Err(e) => return Err(PullError::Transport(format!("admission: {e}"))),
        }
        let leader = match leader_library.leader() {
            Ok(view) => InProcess::new(view),
            Err(e) => return Err(PullError::Transport(e.to_string())),
        };
        let after = request.after;
        match self.fault {
            Fault::Drop => Err(PullError::Transport("request dropped".into())),
            Fault::LoseAnswer => {
                leader.pull(request).await?;
                Err(PullError::Transport("answer lost".into()))
            }
            Fault::Hold => {
                let response = leader.pull(request).await?;
                self.network.held.lock().await.push(Held::Pull {
                    device: self.device,
                    after,
                    response,
                });
                Err(PullError::Transport("answer delayed".into()))
            }
            _ => leader.pull(request).await,
        }
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        if self.fault == Fault::Partitioned {
            return Err(PushError::Transport("partitioned".into()));
        }
        let Some(leader) = self.leader().await else {
            return Err(PushError::Transport("the leader is down".into()));
        };
        match self.fault {
            Fault::Drop => Err(PushError::Transport("request dropped".into())),
            Fault::LoseAnswer => {
                leader.push(request).await?;
                Err(PushError::Transport("acknowledgement lost".into()))
            }
            Fault::Duplicate => {
                leader.push(request.clone()).await?;
                leader.push(request).await
            }
            Fault::Hold => {
                self.network.held.lock().await.push(Held::Push(request));
                Err(PushError::Transport("request delayed".into()))
            }
            _ => leader.push(request).await,
        }
    }
}

/// One run's state.
struct Sim {
    seed: u64,
    rng: StdRng,
    time: Arc<AtomicU64>,
    devices: Vec<Device>,
    network: Arc<Network>,
    library_id: LibraryId,
    dir: PathBuf,
    template: PathBuf,
    reference: Reference,
    outcome: Outcome,
    /// `SYNC_SIM_TRACE` set: every step is printed (to find out why a seed fails).
    trace: bool,
}

/// Runs one seeded simulation of `steps` steps in `dir`, databases copied from
/// `template`. `Err` says which invariant failed.
pub async fn run(seed: u64, steps: usize, template: &Path, dir: &Path) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let time = Arc::new(AtomicU64::new(EPOCH_MS));
    let ids = |salt: u64| -> Vec<String> {
        (0..RECORDS)
            .map(|k| uuid::Uuid::from_u64_pair(seed, salt << 8 | k as u64).to_string())
            .collect()
    };
    let reference = Reference::new(vec![
        ("tag", ids(1)),
        ("volume", ids(2)),
        ("user_metadata", ids(3)),
        ("location", ids(4)),
        (models::COUNTER, ids(5)),
        (models::NOTE, ids(6)),
    ]);
    let leader_skew = skew(&mut rng);
    let leader_url = copy_template(template, dir, "leader")?;
    let leader_db = connect(&leader_url).await?;
    let leader = Library::create(leader_db, "sim", registry()?).await?;
    set_clock(&leader, &time, leader_skew);
    let mut sim = Sim {
        seed,
        rng,
        time,
        devices: vec![Device {
            name: "leader".into(),
            url: leader_url,
            library: Some(leader.clone()),
            skew_ms: leader_skew,
            access: Access::Leader,
            id: leader.device_id(),
            revoked: false,
            partitioned_until: 0,
        }],
        network: Arc::new(Network {
            leader: Mutex::new(Some(leader.clone())),
            held: Mutex::new(Vec::new()),
        }),
        library_id: leader.id(),
        dir: dir.to_owned(),
        template: template.to_owned(),
        reference,
        outcome: Outcome::default(),
        trace: std::env::var_os("SYNC_SIM_TRACE").is_some(),
    };
    for (name, access) in [
        ("a", Access::Write),
        ("b", Access::Write),
        ("r", Access::Read),
    ] {
        sim.join(name, access).await?;
    }
    for step in 0..steps {
        sim.step(step)
            .await
            .with_context(|| format!("seed {seed}, step {step}"))?;
    }
    sim.heal(steps)
        .await
        .with_context(|| format!("seed {seed}, healing"))?;
    sim.check()
        .await
        .with_context(|| format!("seed {seed}, the final check"))?;
    sim.outcome.log_len = leader_of(&sim)?.latest_seq().await?.0;
    sim.outcome.open_conflicts = leader_of(&sim)?.conflict_count().await?;
    for device in sim.devices.iter().filter(|d| d.revoked) {
        if let Some(library) = &device.library {
            sim.outcome.unpushed_of_revoked += library.outbox_len().await?;
        }
    }
    for device in &mut sim.devices {
        if let Some(library) = device.library.take() {
            library.db().clone().close().await?;
        }
    }
    Ok(sim.outcome)
}

fn leader_of(sim: &Sim) -> Result<Library> {
    sim.devices[0]
        .library
        .clone()
        .ok_or_else(|| anyhow!("the leader is down"))
}

/// Mostly small skews; now and then a clock far ahead (capped by the leader).
fn skew(rng: &mut StdRng) -> i64 {
    if rng.random_ratio(1, 8) {
        rng.random_range(0..600_000)
    } else {
        rng.random_range(-2_000..2_000)
    }
}

fn copy_template(template: &Path, dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(format!("{name}.db"));
    std::fs::copy(template, &path).context("copy the template")?;
    Ok(format!("sqlite://{}?mode=rw", path.display()))
}

impl Sim {
    /// A new follower joins: invited and redeemed on the leader, then `Library::join`.
    async fn join(&mut self, name: &str, access: Access) -> Result<()> {
        let leader = leader_of(self)?;
        let url = copy_template(&self.template, &self.dir, name)?;
        let db = connect(&url).await?;
        let key = Library::device_key_of(&db).await?;
        let invite = leader
            .leader()?
            .invite(access, std::time::Duration::from_secs(3_600))
            .await?;
        leader
            .leader()?
            .redeem_invite(&invite.secret, access, key.fingerprint(), Some(name))
            .await?;
        let follower = Library::join(
            db,
            self.library_id,
            leader.device_id(),
            "sim",
            access,
            registry()?,
        )
        .await?;
        let skew_ms = skew(&mut self.rng);
        set_clock(&follower, &self.time, skew_ms);
        self.devices.push(Device {
            name: name.to_owned(),
            url,
            library: Some(follower.clone()),
            skew_ms,
            access,
            id: follower.device_id(),
            revoked: false,
            partitioned_until: 0,
        });
        Ok(())
    }

    fn leader_wall_ms(&self) -> u64 {
        self.time
            .load(Ordering::SeqCst)
            .saturating_add_signed(self.devices[0].skew_ms)
    }

    async fn step(&mut self, step: usize) -> Result<()> {
        if self.trace {
            eprintln!("step {step}");
        }
        self.time
            .fetch_add(self.rng.random_range(0..40), Ordering::SeqCst);
        let d = self.rng.random_range(0..self.devices.len());
        match self.rng.random_range(0..100) {
            0..=39 => {
                // On a device that is up and may write.
                let writers: Vec<usize> = (0..self.devices.len())
                    .filter(|&w| {
                        self.devices[w].access != Access::Read && self.devices[w].library.is_some()
                    })
                    .collect();
                if !writers.is_empty() {
                    let w = writers[self.rng.random_range(0..writers.len())];
                    self.write(w, step).await?;
                }
            }
            40..=69 => self.sync(d, step).await?,
            70..=74 => self.deliver_held().await?,
            75..=79 => self.resolve_one(d).await?,
            80..=81 if d != 0 => {
                // A partition: this follower is cut off for a stretch of steps.
                self.devices[d].partitioned_until = step + self.rng.random_range(5..40);
            }
            82..=83 => {
                let joined = self.devices.len() - 4;
                if joined < JOINS_MAX && self.devices[0].library.is_some() {
                    let access = if self.rng.random_ratio(3, 4) {
                        Access::Write
                    } else {
                        Access::Read
                    };
                    self.join(&format!("j{joined}"), access).await?;
                    self.outcome.joined += 1;
                }
            }
            84 => self.revoke(d).await?,
            85..=89 => self.crash(d).await?,
            _ => self.restart(d).await?,
        }
        Ok(())
    }

    /// A write on a device that may write: of a random model, on a random record.
    async fn write(&mut self, d: usize, step: usize) -> Result<()> {
        if self.devices[d].access == Access::Read {
            return Ok(());
        }
        let Some(library) = self.devices[d].library.clone() else {
            return Ok(());
        };
        let model = self.reference.models()[self.rng.random_range(0..6)];
        let id = self.reference.records(model)[self.rng.random_range(0..RECORDS)].clone();
        let marker = format!("m{}x{step}x{}", self.seed, self.devices[d].name);
        let outbox_before = max_outbox_id(&library).await?;
        let roll = self.rng.random_range(0..10);
        let check = match model {
            "tag" | "volume" => {
                let current = example_app::ops::get(&library, model, &id).await?;
                let private = current
                    .as_ref()
                    .and_then(|c| c.get("name"))
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| model == "tag" && n.starts_with('.'));
                if roll < 2 && current.is_some() {
                    example_app::ops::delete(&library, model, &id).await?;
                    if private {
                        // A row local to this device: its delete is local too.
                        Check::Private
                    } else {
                        Check::Delete
                    }
                } else if roll == 2 && model == "tag" && id == self.reference.records(model)[0] {
                    // Into the private form, or back: the filter flips. (Only on the first
                    // tag: a row private on one device makes every other device's write of
                    // its id a delete, by design, so the others keep the strict check.)
                    put(
                        &library,
                        model,
                        serde_json::json!({"id": id, "name": format!(".{marker}")}),
                    )
                    .await?;
                    Check::Private
                } else if roll == 3 && model == "volume" {
                    // A value the model refuses (a colour longer than its declared 32):
                    // the app is told, and nothing is recorded.
                    let refused = put(
                        &library,
                        model,
                        serde_json::json!({"id": id, "name": marker, "color": "c".repeat(40)}),
                    )
                    .await;
                    if refused.is_ok() {
                        bail!(
                            "a volume colour longer than declared was accepted on {}",
                            self.devices[d].name
                        );
                    }
                    if max_outbox_id(&library).await? != outbox_before {
                        bail!("a refused write left a change in the outbox");
                    }
                    return Ok(());
                } else {
                    put(
                        &library,
                        model,
                        serde_json::json!({"id": id, "name": marker}),
                    )
                    .await?;
                    Check::Lww { marker }
                }
            }
            "user_metadata" => {
                let current = example_app::ops::get(&library, model, &id).await?;
                if roll < 6 {
                    // Add an element to the union field: the device's tags plus one.
                    let mut tags: Vec<serde_json::Value> = current
                        .as_ref()
                        .and_then(|c| c.get("tags"))
                        .and_then(|t| t.as_array())
                        .cloned()
                        .unwrap_or_default();
                    tags.push(serde_json::Value::String(marker.clone()));
                    put(&library, model, serde_json::json!({"id": id, "tags": tags})).await?;
                    Check::Union { element: marker }
                } else {
                    put(
                        &library,
                        model,
                        serde_json::json!({"id": id, "notes": marker}),
                    )
                    .await?;
                    Check::Lww { marker }
                }
            }
            "location" => {
                let field = if roll < 5 { "name" } else { "path" };
                let mut value = serde_json::json!({"id": id, (field): marker});
                if field == "path" {
                    // A new location needs a name.
                    let exists = example_app::ops::get(&library, model, &id).await?.is_some();
                    if !exists {
                        value["name"] = serde_json::Value::String(format!("n{marker}"));
                    }
                }
                put(&library, model, value).await?;
                Check::Manual { marker }
            }
            m if m == models::COUNTER => {
                let count = step as i64 + 1;
                let uuid = parse_uuid(&id)?;
                let label = marker.clone();
                library
                    .transaction(move |txn| {
                        Box::pin(async move {
                            match models::counter::Entity::find_by_id(uuid).one(txn).await? {
                                Some(row) => {
                                    let mut active = row.into_active_model();
                                    active.count = Set(count);
                                    active.label = Set(label);
                                    active.update(txn).await?;
                                }
                                None => {
                                    models::counter::ActiveModel {
                                        id: Set(uuid),
                                        count: Set(count),
                                        label: Set(label),
                                    }
                                    .insert(txn)
                                    .await?;
                                }
                            }
                            Ok::<_, sea_orm::DbErr>(())
                        })
                    })
                    .await?;
                Check::Count { count }
            }
            _ => {
                let uuid = parse_uuid(&id)?;
                let text = marker.clone();
                library
                    .transaction(move |txn| {
                        Box::pin(async move {
                            match models::note::Entity::find_by_id(uuid).one(txn).await? {
                                Some(row) => {
                                    let mut active = row.into_active_model();
                                    active.text = Set(text);
                                    active.update(txn).await?;
                                }
                                None => {
                                    models::note::ActiveModel {
                                        id: Set(uuid),
                                        text: Set(text),
                                    }
                                    .insert(txn)
                                    .await?;
                                }
                            }
                            Ok::<_, sea_orm::DbErr>(())
                        })
                    })
                    .await?;
                Check::Manual { marker }
            }
        };
        let changes = outbox_since(&library, outbox_before).await?;
        if d != 0 && changes.is_empty() && check != Check::Private {
            bail!(
                "a write on {} ({model} {id}) left nothing in the outbox",
                self.devices[d].name
            );
        }
        if self.trace {
            eprintln!(
                "write on {}: {model} {id} {check:?} {changes:?}",
                self.devices[d].name
            );
        }
        self.reference.record(Write {
            device: d,
            model,
            record: id,
            check,
            changes,
            leader_wall_ms: self.leader_wall_ms(),
        });
        self.outcome.writes += 1;
        Ok(())
    }

    /// A sync round of a follower, through a faulty network.
    async fn sync(&mut self, d: usize, step: usize) -> Result<()> {
        if d == 0 {
            return Ok(());
        }
        let Some(library) = self.devices[d].library.clone() else {
            return Ok(());
        };
        let fault = if self.devices[d].partitioned_until > step {
            Fault::Partitioned
        } else {
            match self.rng.random_range(0..12) {
                0 => Fault::Drop,
                1 => Fault::LoseAnswer,
                2 => Fault::Duplicate,
                3 => Fault::Hold,
                _ => Fault::None,
            }
        };
        if fault != Fault::None {
            self.outcome.faults += 1;
        }
        let transport = SimTransport {
            network: Arc::clone(&self.network),
            device: d,
            device_id: self.devices[d].id,
            fault,
        };
        let leader_up = self.network.leader.lock().await.is_some();
        if self.devices[d].revoked && leader_up && fault == Fault::None {
            // A revoked follower must not be served: nothing of its outbox taken, nothing
            // pulled.
            let leader = leader_of(self)?;
            let taken_before = reference::taken_of(&leader, self.devices[d].id).await?;
            let position = library.position().await?;
            if sync_round(&library, &transport).await.is_ok() {
                bail!("revoked {} synced without a refusal", self.devices[d].name);
            }
            if reference::taken_of(&leader, self.devices[d].id).await? != taken_before {
                bail!(
                    "the leader took changes of revoked {}",
                    self.devices[d].name
                );
            }
            if library.position().await? != position {
                bail!("revoked {} pulled entries", self.devices[d].name);
            }
            return Ok(());
        }
        // Failures are the point here: the round is retried later.
        let result = sync_round(&library, &transport).await;
        if self.trace {
            eprintln!(
                "sync of {} ({}): {:?} -> position {}",
                self.devices[d].name,
                fault.name(),
                result.err().map(|e| e.to_string()),
                library.position().await?.seq.0
            );
        }
        Ok(())
    }

    /// The network delivers one message it held back, late.
    async fn deliver_held(&mut self) -> Result<()> {
        let mut held = self.network.held.lock().await;
        if held.is_empty() {
            return Ok(());
        }
        let at = self.rng.random_range(0..held.len());
        let message = held.remove(at);
        drop(held);
        self.outcome.delivered_late += 1;
        match message {
            Held::Push(request) => match self.network.leader.lock().await.clone() {
                // The answer goes nowhere: its author gave up on this request.
                Some(leader) => {
                    let answer = leader.leader()?.serve_push(&request).await;
                    if self.trace {
                        eprintln!("late push delivered: {answer:?}");
                    }
                }
                None => self.network.held.lock().await.push(Held::Push(request)),
            },
            Held::Pull {
                device,
                after,
                response,
            } => {
                if let Some(library) = self.devices[device].library.clone() {
                    // Refused unless it still continues the follower's history.
                    let applied = library.follower()?.apply(after, response).await;
                    if self.trace {
                        eprintln!(
                            "late pull answer to {} (after {}): {:?}",
                            self.devices[device].name,
                            after.0,
                            applied.map(|a| a.position.seq.0)
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves one open conflict on a device that may write, at random.
    async fn resolve_one(&mut self, d: usize) -> Result<()> {
        if self.devices[d].access == Access::Read || self.devices[d].revoked {
            return Ok(());
        }
        let Some(library) = self.devices[d].library.clone() else {
            return Ok(());
        };
        let conflicts = library.conflicts().await?;
        if conflicts.is_empty() {
            return Ok(());
        }
        let conflict = &conflicts[self.rng.random_range(0..conflicts.len())];
        let resolution = if self.rng.random_bool(0.5) {
            Resolution::TakeLocal
        } else {
            Resolution::TakeRemote
        };
        let outbox_before = max_outbox_id(&library).await?;
        library
            .resolve(&conflict.id, resolution)
            .await
            .with_context(|| format!("resolve {} on {}", conflict.id, self.devices[d].name))?;
        let changes = outbox_since(&library, outbox_before).await?;
        self.reference.record(Write {
            device: d,
            model: "sync_conflict",
            record: conflict.id.clone(),
            check: Check::Resolve,
            changes,
            leader_wall_ms: self.leader_wall_ms(),
        });
        self.outcome.resolved += 1;
        Ok(())
    }

    /// The leader revokes a follower (at most one per run).
    async fn revoke(&mut self, d: usize) -> Result<()> {
        if d == 0 || self.devices.iter().any(|d| d.revoked) {
            return Ok(());
        }
        let Some(leader) = self.devices[0].library.clone() else {
            return Ok(());
        };
        leader.leader()?.revoke(self.devices[d].id).await?;
        self.devices[d].revoked = true;
        if self.trace {
            eprintln!("revoked {}", self.devices[d].name);
        }
        self.outcome.revoked += 1;
        Ok(())
    }

    /// A crash: the handle and its connections are gone; the database stays.
    async fn crash(&mut self, d: usize) -> Result<()> {
        if let Some(library) = self.devices[d].library.take() {
            if d == 0 {
                self.network.leader.lock().await.take();
            }
            library.db().clone().close().await?;
            self.outcome.crashes += 1;
            if self.trace {
                eprintln!("crash of {}", self.devices[d].name);
            }
        }
        Ok(())
    }

    async fn restart(&mut self, d: usize) -> Result<()> {
        if self.devices[d].library.is_none() {
            let library = reopen(&self.devices[d], self.library_id, &self.time).await?;
            if d == 0 {
                *self.network.leader.lock().await = Some(library.clone());
            }
            self.devices[d].library = Some(library);
        }
        Ok(())
    }

    /// Everyone back, the network whole, held messages delivered (or lost), conflicts
    /// resolved or left open, every member synced until quiet.
    async fn heal(&mut self, steps: usize) -> Result<()> {
        for d in 0..self.devices.len() {
            self.restart(d).await?;
            self.devices[d].partitioned_until = 0;
        }
        while !self.network.held.lock().await.is_empty() {
            if self.rng.random_bool(0.5) {
                self.deliver_held().await?;
            } else {
                self.network.held.lock().await.pop();
            }
        }
        self.settle(steps).await?;
        // Some conflicts resolved at the end, on the leader; the rest stay listed.
        let leader = leader_of(self)?;
        if self.rng.random_bool(0.5) {
            for _ in 0..leader.conflicts().await?.len() {
                if self.rng.random_bool(0.7) {
                    self.resolve_one(0).await?;
                }
            }
            self.settle(steps).await?;
        }
        Ok(())
    }

    /// Sync rounds of every member follower until all have pushed everything and reached
    /// the leader's latest seq.
    async fn settle(&mut self, step: usize) -> Result<()> {
        let leader = leader_of(self)?;
        for _ in 0..HEAL_ROUNDS_MAX {
            self.time.fetch_add(10, Ordering::SeqCst);
            for d in 1..self.devices.len() {
                if self.devices[d].revoked {
                    continue;
                }
                let follower = self.devices[d]
                    .library
                    .clone()
                    .ok_or_else(|| anyhow!("{} is down", self.devices[d].name))?;
                let clean = SimTransport {
                    network: Arc::clone(&self.network),
                    device: d,
                    device_id: self.devices[d].id,
                    fault: Fault::None,
                };
                sync_round(&follower, &clean)
                    .await
                    .with_context(|| format!("sync of {}", self.devices[d].name))?;
            }
            let latest = leader.latest_seq().await?;
            let mut all = true;
            for device in self.devices.iter().skip(1).filter(|d| !d.revoked) {
                let library = device
                    .library
                    .as_ref()
                    .ok_or_else(|| anyhow!("{} is down", device.name))?;
                all &= library.outbox_len().await? == 0 && library.position().await?.seq == latest;
            }
            if all {
                return Ok(());
            }
        }
        bail!(
            "the devices did not come to rest within {HEAL_ROUNDS_MAX} sync rounds (after step {step})"
        )
    }

    /// The invariants after a healed run.
    async fn check(&mut self) -> Result<()> {
        let leader = leader_of(self)?;
        // Gap-free and chained.
        let log = leader.read_log(Seq::ZERO, u64::MAX).await?;
        sync_core::verify_chain(Seq::ZERO, 0, &log)
            .map_err(|e| anyhow!("the leader's log: {e}"))?;
        if log.last().map_or(Seq::ZERO, |e| e.seq) != leader.latest_seq().await? {
            bail!("the leader's latest seq is not its last entry");
        }
        // Converged, nothing waiting, nothing set aside; a revoked follower is out.
        let expected = leader.dump().await?;
        for device in self.devices.iter().skip(1).filter(|d| !d.revoked) {
            let library = device
                .library
                .as_ref()
                .ok_or_else(|| anyhow!("{} is down", device.name))?;
            let dump = library.dump().await?;
            if dump != expected {
                bail!(
                    "{} differs from the leader:\n  leader: {}\n  {}: {}",
                    device.name,
                    serde_json::to_string(&expected)?,
                    device.name,
                    serde_json::to_string(&dump)?
                );
            }
            if library.outbox_len().await? != 0 {
                bail!("{} still has changes in its outbox", device.name);
            }
            if library.parked_count().await? != 0 {
                bail!("{} parked entries nobody asked to park", device.name);
            }
            if library.conflicts().await? != leader.conflicts().await? {
                bail!("{} lists other conflicts than the leader", device.name);
            }
        }
        if leader.rejected_count().await? != 0 {
            bail!(
                "the leader rejected changes: {:?}",
                leader.rejected().await?
            );
        }
        let members: Vec<(DeviceId, Option<Library>, bool)> = self
            .devices
            .iter()
            .map(|d| (d.id, d.library.clone(), d.revoked))
            .collect();
        self.reference
            .check(&leader, &log, &expected, &members)
            .await
    }
}

async fn put(
    library: &Library,
    model: &str,
    value: serde_json::Value,
) -> Result<serde_json::Value> {
    example_app::ops::put(library, model, &value.to_string()).await
}

fn parse_uuid(id: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(id).with_context(|| format!("`{id}` is not a UUID"))
}

/// The newest outbox row's id (0 when empty; always 0 on the leader).
async fn max_outbox_id(library: &Library) -> Result<i64> {
    Ok(reference::outbox(library)
        .await?
        .last()
        .map_or(0, |row| row.id))
}

/// The outbox rows written after `after`.
async fn outbox_since(library: &Library, after: i64) -> Result<Vec<reference::Change>> {
    Ok(reference::outbox(library)
        .await?
        .into_iter()
        .filter(|row| row.id > after)
        .collect())
}

/// One follow-loop round by hand: push the outbox, then pull until caught up.
async fn sync_round(library: &Library, transport: &dyn Transport) -> Result<()> {
    if !library.is_read_only() {
        library.follower()?.push_outbox(transport).await?;
    }
    library.follower()?.catch_up(transport, 1_000).await?;
    Ok(())
}

fn set_clock(library: &Library, time: &Arc<AtomicU64>, skew_ms: i64) {
    let time = Arc::clone(time);
    library.set_wall_clock(Arc::new(move || {
        time.load(Ordering::SeqCst).saturating_add_signed(skew_ms)
    }));
}

async fn reopen(device: &Device, library: LibraryId, time: &Arc<AtomicU64>) -> Result<Library> {
    let db = connect(&device.url).await?;
    let reopened = Library::open(db, library, registry()?).await?;
    set_clock(&reopened, time, device.skew_ms);
    Ok(reopened)
}
