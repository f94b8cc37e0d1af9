//! A seeded simulation of a library: a leader, two write followers and a read follower,
//! each on its own SQLite database, running the real library over a simulated transport
//! that drops requests, loses acknowledgements and sends pushes twice; devices crash
//! (their handles and connections are dropped; the database keeps what was committed)
//! and restart; every device's clock is simulated, with skew (one device may run far
//! ahead). After the random steps the network heals, every device syncs until quiet, and
//! the invariants are checked. One seed is one run: `SYNC_SIM_SEED=<seed>` replays it.
//!
//! This is the first cut of issue 11's simulator: it drives the library's async shells
//! step by step (each step completes before the next starts), not yet a core without
//! I/O. What it does not yet model is listed in ARCHITECTURE.md (*Simulation*).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm_migration::MigratorTrait;
use sync_core::{
    Access, InProcess, Library, LibraryId, PullError, PullRequest, PullResponse, PushError,
    PushRequest, PushResponse, Seq, Transport,
};
use tokio::sync::Mutex;

/// Steps per run unless asked otherwise.
pub const STEPS: usize = 120;

/// Records the simulation writes: few, so that devices often edit the same ones.
const RECORDS: usize = 5;

/// The simulated epoch every clock starts from (2027-01-15), in milliseconds.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// Sync rounds after the steps before the run must be quiet.
const HEAL_ROUNDS_MAX: usize = 12;

/// What one run did, for the summary.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Writes made (committed) on any device.
    pub writes: u64,
    /// Crashes.
    pub crashes: u64,
    /// Requests dropped, acknowledgements lost, pushes sent twice.
    pub faults: u64,
    /// Entries in the leader's log at the end.
    pub log_len: u64,
}

/// A migrated, empty SQLite database file to copy for each device (migrating is most of
/// a run's cost otherwise).
pub async fn template(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("template.db");
    let db = example_app::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
    example_app::Migrator::up(&db, None).await?;
    db.close().await?;
    Ok(path)
}

struct Device {
    name: &'static str,
    url: String,
    library: Option<Library>,
    /// Added to the simulated time: this device's clock skew.
    skew_ms: i64,
    access: Access,
}

/// The leader as followers reach it: through faults, and not at all while it is down.
struct Network {
    leader: Mutex<Option<Library>>,
}

struct SimTransport {
    network: Arc<Network>,
    /// 0: deliver; 1: drop the request; 2: deliver, lose the answer; 3: deliver twice.
    fault: u8,
}

impl SimTransport {
    async fn leader(&self) -> Option<InProcess> {
        let leader = self.network.leader.lock().await.clone()?;
        leader.leader().ok().map(InProcess::new)
    }
}

#[async_trait::async_trait]
impl Transport for SimTransport {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        let Some(leader) = self.leader().await else {
            return Err(PullError::Transport("the leader is down".into()));
        };
        match self.fault {
            1 => Err(PullError::Transport("request dropped".into())),
            2 => {
                leader.pull(request).await?;
                Err(PullError::Transport("answer lost".into()))
            }
            _ => leader.pull(request).await,
        }
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        let Some(leader) = self.leader().await else {
            return Err(PushError::Transport("the leader is down".into()));
        };
        match self.fault {
            1 => Err(PushError::Transport("request dropped".into())),
            2 => {
                leader.push(request).await?;
                Err(PushError::Transport("acknowledgement lost".into()))
            }
            3 => {
                leader.push(request.clone()).await?;
                leader.push(request).await
            }
            _ => leader.push(request).await,
        }
    }
}

/// Runs one seeded simulation of `steps` steps in `dir`, databases copied from
/// `template`. `Err` says which invariant failed.
pub async fn run(seed: u64, steps: usize, template: &Path, dir: &Path) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let time = Arc::new(AtomicU64::new(EPOCH_MS));
    let mut outcome = Outcome::default();
    let registry = example_app::registry;
    let mut devices = Vec::new();
    for (name, access) in [
        ("leader", Access::Leader),
        ("a", Access::Write),
        ("b", Access::Write),
        ("r", Access::Read),
    ] {
        let path = dir.join(format!("{name}.db"));
        std::fs::copy(template, &path).context("copy the template")?;
        // Mostly small skews; now and then a clock far ahead (capped by the leader).
        let skew_ms = if rng.random_ratio(1, 8) {
            rng.random_range(0..600_000)
        } else {
            rng.random_range(-2_000..2_000)
        };
        devices.push(Device {
            name,
            url: format!("sqlite://{}?mode=rw", path.display()),
            library: None,
            skew_ms,
            access,
        });
    }
    let leader_db = example_app::connect(&devices[0].url).await?;
    let leader = Library::create(leader_db, "sim", registry()).await?;
    set_clock(&leader, &time, devices[0].skew_ms);
    let library_id = leader.id();
    for device in devices.iter_mut().skip(1) {
        let db = example_app::connect(&device.url).await?;
        let key = Library::device_key_of(&db).await?;
        let access = device.access;
        let invite = leader
            .leader()
            .expect("the leader")
            .invite(access, std::time::Duration::from_secs(3_600))
            .await?;
        leader
            .leader()
            .expect("the leader")
            .redeem_invite(&invite.secret, access, key.device_id(), Some(device.name))
            .await?;
        let follower = Library::join(
            db,
            library_id,
            leader.device_id(),
            "sim",
            access,
            registry(),
        )
        .await?;
        set_clock(&follower, &time, device.skew_ms);
        device.library = Some(follower);
    }
    devices[0].library = Some(leader.clone());
    let network = Arc::new(Network {
        leader: Mutex::new(Some(leader)),
    });
    let ids: Vec<String> = (0..RECORDS)
        .map(|k| uuid::Uuid::from_u64_pair(seed, k as u64).to_string())
        .collect();

    for step in 0..steps {
        time.fetch_add(rng.random_range(0..40), Ordering::SeqCst);
        let d = rng.random_range(0..devices.len());
        match rng.random_range(0..100) {
            // A write on a device that may write.
            0..=44 => {
                if devices[d].access == Access::Read {
                    continue;
                }
                let Some(library) = devices[d].library.clone() else {
                    continue;
                };
                let id = &ids[rng.random_range(0..RECORDS)];
                let exists = example_app::ops::get(&library, "tag", id).await?.is_some();
                let written = match rng.random_range(0..10) {
                    0..=1 if exists => example_app::ops::delete(&library, "tag", id).await,
                    // Into the private form, or back: the filter flips.
                    2 => put(&library, id, &format!(".{seed}-{step}"))
                        .await
                        .map(drop),
                    _ => put(&library, id, &format!("{seed}-{step}-{}", devices[d].name))
                        .await
                        .map(drop),
                };
                written.with_context(|| format!("step {step}: write on {}", devices[d].name))?;
                outcome.writes += 1;
            }
            // A sync round of a follower, through a faulty network.
            45..=79 => {
                if d == 0 {
                    continue;
                }
                let Some(library) = devices[d].library.clone() else {
                    continue;
                };
                let fault = match rng.random_range(0..10) {
                    0 => 1,
                    1 => 2,
                    2 => 3,
                    _ => 0,
                };
                if fault != 0 {
                    outcome.faults += 1;
                }
                let transport = SimTransport {
                    network: Arc::clone(&network),
                    fault,
                };
                // Failures are the point here: the round is retried later.
                let _ = sync_round(&library, &transport).await;
            }
            // A crash: the handle and its connections are gone; the database stays.
            80..=89 => {
                if let Some(library) = devices[d].library.take() {
                    if d == 0 {
                        network.leader.lock().await.take();
                    }
                    library.db().clone().close().await?;
                    outcome.crashes += 1;
                }
            }
            // A restart.
            _ => {
                if devices[d].library.is_none() {
                    let library = reopen(&devices[d], library_id, &time).await?;
                    if d == 0 {
                        *network.leader.lock().await = Some(library.clone());
                    }
                    devices[d].library = Some(library);
                }
            }
        }
    }

    // Heal: everyone back, no faults, sync until quiet.
    for (i, device) in devices.iter_mut().enumerate() {
        if device.library.is_none() {
            let library = reopen(device, library_id, &time).await?;
            if i == 0 {
                *network.leader.lock().await = Some(library.clone());
            }
            device.library = Some(library);
        }
    }
    let libraries: Vec<Library> = devices
        .iter()
        .map(|d| {
            d.library
                .clone()
                .ok_or_else(|| anyhow!("{} is down", d.name))
        })
        .collect::<Result<_>>()?;
    let leader = libraries[0].clone();
    let clean = SimTransport {
        network: Arc::clone(&network),
        fault: 0,
    };
    let mut quiet = false;
    for _ in 0..HEAL_ROUNDS_MAX {
        time.fetch_add(10, Ordering::SeqCst);
        for follower in &libraries[1..] {
            sync_round(follower, &clean)
                .await
                .with_context(|| format!("heal: sync of {}", follower.device_id()))?;
        }
        let latest = leader.latest_seq().await?;
        let mut all = true;
        for follower in &libraries[1..] {
            all &= follower.outbox_len().await? == 0 && follower.position().await?.seq == latest;
        }
        if all {
            quiet = true;
            break;
        }
    }
    if !quiet {
        bail!("the devices did not come to rest within {HEAL_ROUNDS_MAX} sync rounds");
    }
    check(&libraries, &devices).await?;
    outcome.log_len = leader.latest_seq().await?.0;
    for library in libraries {
        library.db().clone().close().await?;
    }
    Ok(outcome)
}

/// The invariants after a healed run.
async fn check(libraries: &[Library], devices: &[Device]) -> Result<()> {
    let leader = &libraries[0];
    // Gap-free and chained.
    let log = leader.read_log(Seq::ZERO, u64::MAX).await?;
    sync_core::verify_chain(Seq::ZERO, 0, &log).map_err(|e| anyhow!("the leader's log: {e}"))?;
    if log.last().map_or(Seq::ZERO, |e| e.seq) != leader.latest_seq().await? {
        bail!("the leader's latest seq is not its last entry");
    }
    // Converged, nothing waiting, nothing set aside.
    let expected = leader.dump().await?;
    for (library, device) in libraries.iter().zip(devices).skip(1) {
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
    }
    if leader.rejected_count().await? != 0 {
        bail!(
            "the leader rejected changes: {:?}",
            leader.rejected().await?
        );
    }
    Ok(())
}

async fn put(library: &Library, id: &str, name: &str) -> Result<serde_json::Value> {
    example_app::ops::put(
        library,
        "tag",
        &serde_json::json!({"id": id, "name": name}).to_string(),
    )
    .await
}

/// One follow-loop round by hand: push the outbox, then pull until caught up.
async fn sync_round(library: &Library, transport: &dyn Transport) -> Result<()> {
    if !library.is_read_only() {
        library
            .follower()
            .expect("a follower")
            .push_outbox(transport)
            .await?;
    }
    library
        .follower()
        .expect("a follower")
        .catch_up(transport, 1_000)
        .await?;
    Ok(())
}

fn set_clock(library: &Library, time: &Arc<AtomicU64>, skew_ms: i64) {
    let time = Arc::clone(time);
    library.set_wall_clock(Arc::new(move || {
        time.load(Ordering::SeqCst).saturating_add_signed(skew_ms)
    }));
}

async fn reopen(device: &Device, library: LibraryId, time: &Arc<AtomicU64>) -> Result<Library> {
    let db = example_app::connect(&device.url).await?;
    let reopened = Library::open(db, library, example_app::registry()).await?;
    set_clock(&reopened, time, device.skew_ms);
    Ok(reopened)
}
