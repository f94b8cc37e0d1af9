//! Network benchmarks (`example-app bench live|catchup|fanout`): a leader and followers
//! on SQLite files in a temp dir, over QUIC on loopback. Each prints its figures as one
//! JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sea_orm::{ActiveModelTrait, Set};
use serde_json::json;
use sync_core::{Access, FollowConfig, InProcess, Library, PullRequest, Seq};
use sync_transport::{Server, frame};

use crate::models::tag;
use crate::{Migrator, connect, net, registry};
use sea_orm_migration::MigratorTrait;

async fn leader_in(dir: &std::path::Path) -> Result<(Library, Server)> {
    let url = format!("sqlite://{}?mode=rwc", dir.join("leader.db").display());
    let db = connect(&url).await?;
    Migrator::up(&db, None).await?;
    let leader = Library::create(db, "bench", registry()).await?;
    let server = net::serve(&leader, "127.0.0.1:0".parse()?).await?;
    Ok((leader, server))
}

async fn follower_in(dir: &std::path::Path, leader: &Library, name: &str) -> Result<Library> {
    let token = net::invite(leader, Access::Read, Duration::from_secs(600), None).await?;
    let url = format!("sqlite://{}?mode=rwc", dir.join(name).display());
    net::join(&url, &token, Some(name)).await
}

/// A read-only follower of `leader` on the SQLite database at `url`, joined in process
/// (no invitation): for benchmarks over the in-process transport.
pub async fn in_process_follower(url: &str, leader: &Library) -> Result<Library> {
    let db = connect(url).await?;
    Migrator::up(&db, None).await?;
    Ok(Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "bench",
        Access::Read,
        registry(),
    )
    .await?)
}

/// Writes `count` tags, `per_txn` per transaction.
pub async fn write_tags(library: &Library, count: u64, per_txn: u64) -> Result<()> {
    let mut written = 0;
    while written < count {
        let n = (count - written).min(per_txn.max(1));
        library
            .transaction(move |txn| {
                Box::pin(async move {
                    for i in 0..n {
                        tag::ActiveModel {
                            id: Set(uuid::Uuid::now_v7()),
                            name: Set(format!("tag {}", written + i)),
                            color: Set(Some("#336699".to_owned())),
                        }
                        .insert(txn)
                        .await?;
                    }
                    Ok::<_, sea_orm::DbErr>(())
                })
            })
            .await?;
        written += n;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Commit on the leader to applied on a live follower, one write at a time.
pub async fn live(writes: u64) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let (leader, server) = leader_in(dir.path()).await?;
    let follower = follower_in(dir.path(), &leader, "follower.db").await?;
    let transport = net::transport(&follower, None).await?;
    let config = FollowConfig {
        // Live notices only: a poll must not explain a fast apply.
        poll_interval: Duration::from_secs(3_600),
        ..FollowConfig::default()
    };
    let follow = follower.follower()?.start_following(transport, config);
    let mut applied = follow.subscribe();
    let mut latencies = Vec::with_capacity(writes as usize);
    for i in 0..writes {
        write_tags(&leader, 1, 1).await?;
        // The write has committed when `transaction` returns.
        let committed = Instant::now();
        let target = Seq(i + 1);
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), applied.recv())
                .await
                .context("no apply within 10 s")??;
            if event.position >= target {
                break;
            }
        }
        latencies.push(committed.elapsed().as_secs_f64() * 1e3);
    }
    follow.stop().await;
    server.shutdown().await;
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "bench": "live",
        "writes": writes,
        "p50_ms": percentile(&latencies, 50.0),
        "p99_ms": percentile(&latencies, 99.0),
        "max_ms": latencies.last(),
    }))
}

/// Catch-up of `count` changes over QUIC against the in-process transport, and the bytes
/// per change on the wire with and without compression.
pub async fn catchup(count: u64, batch: u32) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let (leader, server) = leader_in(dir.path()).await?;
    write_tags(&leader, count, 1_000).await?;

    let quic_follower = follower_in(dir.path(), &leader, "quic.db").await?;
    let transport = net::transport(&quic_follower, None).await?;
    let started = Instant::now();
    quic_follower
        .follower()?
        .catch_up(transport.as_ref(), batch)
        .await?;
    let quic_seconds = started.elapsed().as_secs_f64();

    let local_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("local.db").display()
    );
    let local_follower = in_process_follower(&local_url, &leader).await?;
    let started = Instant::now();
    local_follower
        .follower()?
        .catch_up(&InProcess::new(leader.leader()?), batch)
        .await?;
    let in_process_seconds = started.elapsed().as_secs_f64();
    if leader.dump().await? != quic_follower.dump().await? {
        bail!("the QUIC follower does not match the leader");
    }

    // Bytes per change: the first full response, framed as sent and as plain JSON.
    let mut request = PullRequest::after(leader.id(), Seq::ZERO);
    request.limit = batch;
    let response = leader.leader()?.serve_pull(&request).await?;
    let entries = response.items.len().max(1) as f64;
    let framed = frame::encode(&frame::Response::Pulled(response.clone()))?.len() as f64;
    let plain = serde_json::to_vec(&frame::Response::Pulled(response))?.len() as f64;
    server.shutdown().await;
    Ok(json!({
        "bench": "catchup",
        "changes": count,
        "batch": batch,
        "quic_seconds": quic_seconds,
        "quic_changes_per_second": count as f64 / quic_seconds,
        "in_process_seconds": in_process_seconds,
        "in_process_changes_per_second": count as f64 / in_process_seconds,
        "quic_over_in_process_throughput": in_process_seconds / quic_seconds,
        "wire_bytes_per_change_compressed": framed / entries,
        "wire_bytes_per_change_uncompressed": plain / entries,
    }))
}

/// A planned handoff over loopback QUIC (see `example-app bench handoff`).
pub async fn handoff(followers: usize, count: u64) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let (leader, server) = leader_in(dir.path()).await?;
    let started = Instant::now();
    write_tags(&leader, count, 1_000).await?;
    let write_seconds = started.elapsed().as_secs_f64();
    let mut devices = Vec::with_capacity(followers);
    for n in 0..followers {
        let access = if n == 0 { Access::Write } else { Access::Read };
        let token = net::invite(&leader, access, Duration::from_secs(600), None).await?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(format!("f{n}.db")).display()
        );
        devices.push(net::join(&url, &token, Some(&format!("f{n}"))).await?);
    }
    // The target serves from the start, as a follower's `serve` does.
    let target = devices[0].clone();
    let target_server = net::serve(&target, "127.0.0.1:0".parse()?).await?;
    let started = Instant::now();
    let mut follows = Vec::with_capacity(followers);
    for device in &devices {
        let transport = net::transport(device, None).await?;
        follows.push(
            device
                .follower()?
                .start_following(transport, FollowConfig::default()),
        );
    }
    let latest = leader.latest_seq().await?;
    let deadline = Duration::from_secs(3_600);
    for follow in &follows {
        follow
            .wait_for(deadline, |s| s.position >= latest)
            .await
            .context("a follower did not catch up")?;
    }
    let catch_up_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let handed = leader
        .leader()?
        .hand_off(target.device_id(), Duration::from_secs(600))
        .await?;
    let hand_off_seconds = started.elapsed().as_secs_f64();
    follows[0]
        .wait_for(deadline, |s| s.state == sync_core::FollowState::Leading)
        .await
        .context("the target did not take over")?;
    let leading_seconds = started.elapsed().as_secs_f64();
    let after = crate::ops::put(&target, "tag", r#"{"name":"at the new leader"}"#).await?;
    let _ = after;
    let latest = target.latest_seq().await?;
    for follow in &follows[1..] {
        follow
            .wait_for(deadline, |s| s.position >= latest)
            .await
            .context("a follower did not follow the new leader")?;
    }
    let all_following_seconds = started.elapsed().as_secs_f64();
    for device in &devices[1..] {
        if device.leader_device_id() != target.device_id() {
            bail!("a follower does not know the new leader");
        }
    }
    if devices[followers - 1].dump().await? != target.dump().await? {
        bail!("a follower does not match the new leader");
    }
    for follow in follows {
        follow.stop().await;
    }
    target_server.shutdown().await;
    server.shutdown().await;
    Ok(json!({
        "bench": "handoff",
        "transport": "loopback QUIC",
        "backend": "sqlite",
        "followers": followers,
        "entries": count,
        "record_seq": handed.record_seq.0,
        "taken_marks": handed.taken_marks,
        "write_seconds": write_seconds,
        "catch_up_seconds": catch_up_seconds,
        "hand_off_seconds": hand_off_seconds,
        "target_leads_seconds": leading_seconds,
        "all_following_seconds": all_following_seconds,
    }))
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A `/proc/self/status` figure in KiB: `VmRSS` (now) or `VmHWM` (peak).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

/// Microseconds since the Unix epoch: leader and followers run in two processes on one
/// machine, so commit and apply times are compared on the wall clock.
fn unix_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// What `bench fanout` is asked to do.
#[derive(Clone, Debug)]
pub struct FanoutOptions {
    /// The leader's database: `sqlite` (a file in a temp dir) or a server URL, on which a
    /// fresh database is made and dropped.
    pub leader_db: String,
    /// Live followers, each its own SQLite file and QUIC session, in one child process.
    pub followers: usize,
    /// Writes timed from commit to applied on every follower, one per transaction.
    pub writes: u64,
    /// Pause between two writes (also between the writes made while followers join).
    pub interval: Duration,
    /// Followers joining at once.
    pub join_concurrency: usize,
}

/// How long a phase of `fanout` may take before the bench gives up.
const FANOUT_PHASE_TIMEOUT: Duration = Duration::from_secs(1_800);

/// One leader (this process) and `followers` live followers in a child process. The
/// followers join while the leader keeps writing, catch up, then each of `writes` writes
/// is timed from its commit to its apply on every follower. Any refusal or error a
/// follower meets (a failed join, a failed pull) is counted, and the bench fails if there
/// is one. Reports the leader's memory and CPU per follower.
pub async fn fanout(options: &FanoutOptions) -> Result<serde_json::Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir()?;
    let url = crate::fresh_database(&options.leader_db, dir.path()).await?;
    let backend = url.split(':').next().unwrap_or("sqlite").to_owned();
    let db = connect(&url).await?;
    Migrator::up(&db, None).await?;
    let leader = Library::create(db, "bench", registry()).await?;
    let server = net::serve(&leader, "127.0.0.1:0".parse()?).await?;
    write_tags(&leader, 100, 100).await?;
    let rss_alone = rss_kib();
    let mut tokens = Vec::with_capacity(options.followers);
    for _ in 0..options.followers {
        tokens.push(net::invite(&leader, Access::Read, Duration::from_secs(3_600), None).await?);
    }
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "fanout-followers", "--dir"])
        .arg(dir.path())
        .arg("--join-concurrency")
        .arg(options.join_concurrency.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the followers' process")?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();

    // Joining and catching up while the leader writes: admissions race writes.
    let cpu_before_join = cpu_seconds();
    let join_started = Instant::now();
    let (stop_writing, mut stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let leader = leader.clone();
        let interval = options.interval;
        tokio::spawn(async move {
            let mut written = 0u64;
            while !*stopped.borrow() {
                write_tags(&leader, 1, 1).await?;
                written += 1;
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => {}
                }
            }
            Ok::<_, anyhow::Error>(written)
        })
    };
    for token in &tokens {
        stdin.write_all(format!("{token}\n").as_bytes()).await?;
    }
    // An empty line ends the tokens.
    stdin.write_all(b"\n").await?;
    let joined = expect_line(&mut lines, "joined").await?;
    let _ = stop_writing.send(true);
    let written_while_joining = writer.await.context("the leader's writer panicked")??;
    let latest = leader.latest_seq().await?;
    stdin
        .write_all(format!("wait {latest}\n").as_bytes())
        .await?;
    expect_line(&mut lines, "caught-up").await?;
    let join_seconds = join_started.elapsed().as_secs_f64();
    let cpu_join = cpu_seconds()
        .zip(cpu_before_join)
        .map(|(after, before)| after - before);
    let rss_connected = rss_kib();

    // Live writes, each timed from commit to applied on every follower.
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let base = leader.latest_seq().await?;
    let mut commits = Vec::with_capacity(options.writes as usize);
    for i in 0..options.writes {
        write_tags(&leader, 1, 1).await?;
        // One writer: the i-th write is the i-th entry after `base` (on PostgreSQL it is
        // numbered just after commit; that wait counts towards its latency).
        commits.push((base.0 + i + 1, unix_micros()));
        tokio::time::sleep(options.interval).await;
    }
    let latest = leader.latest_seq().await?;
    stdin
        .write_all(format!("wait {latest}\n").as_bytes())
        .await?;
    expect_line(&mut lines, "caught-up").await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let rss_after = rss_kib();
    stdin
        .write_all(format!("report {}\n", serde_json::to_string(&commits)?).as_bytes())
        .await?;
    let report: serde_json::Value =
        serde_json::from_str(&expect_line(&mut lines, "report").await?)?;
    drop(stdin);
    let _ = child.wait().await;
    server.shutdown().await;
    leader.db().clone().close().await.ok();
    crate::drop_database(&url).await?;

    let followers = options.followers as f64;
    let per_follower_kib = rss_connected
        .zip(rss_alone)
        .map(|(c, a)| c.saturating_sub(a) as f64 / followers);
    let refusals = report["join_failures"].as_u64().unwrap_or(0)
        + report["follow_errors"].as_u64().unwrap_or(0)
        + report["missing"].as_u64().unwrap_or(0);
    let figures = json!({
        "bench": "fanout",
        "backend": backend,
        "followers": options.followers,
        "joined": joined.parse::<u64>().ok(),
        "refusals_and_errors": refusals,
        "join_failures": report["join_failures"],
        "follow_errors": report["follow_errors"],
        "first_error": report["first_error"],
        "writes": options.writes,
        "interval_ms": options.interval.as_secs_f64() * 1e3,
        "writes_while_joining": written_while_joining,
        "join_and_catch_up_seconds": join_seconds,
        "commit_to_applied_samples": report["samples"],
        "commit_to_applied_missing": report["missing"],
        "commit_to_applied_p50_ms": report["p50_ms"],
        "commit_to_applied_p99_ms": report["p99_ms"],
        "commit_to_applied_max_ms": report["max_ms"],
        "live_seconds": seconds,
        // The followers' process shares the machine's cores with the leader: its CPU
        // (all phases) says how much of the latency is theirs.
        "followers_process_cpu_seconds": report["cpu_seconds"],
        "followers_process_rss_kib": report["rss_kib"],
        "leader_rss_kib_alone": rss_alone,
        "leader_rss_kib_with_followers": rss_connected,
        "leader_rss_kib_after_writes": rss_after,
        "leader_peak_rss_kib": status_kib("VmHWM:"),
        "leader_rss_kib_per_follower": per_follower_kib,
        "leader_cpu_seconds_joining": cpu_join,
        "leader_cpu_ms_per_follower_joining": cpu_join.map(|c| c * 1e3 / followers),
        "leader_cpu_seconds_live": cpu,
        "leader_cpu_ms_per_write_per_follower": cpu.map(|c| c * 1e3 / options.writes.max(1) as f64 / followers),
    });
    if refusals > 0 {
        bail!(
            "{refusals} refusal(s), error(s) or unrecorded apply(s) among the followers; \
             first error: {}\n{figures}",
            report["first_error"]
        );
    }
    Ok(figures)
}

/// Waits for the child's next line, which must start with `expected`; returns the rest.
async fn expect_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    expected: &str,
) -> Result<String> {
    let line = tokio::time::timeout(FANOUT_PHASE_TIMEOUT, lines.next_line())
        .await
        .context("the followers' process did not answer in time")??;
    match line {
        Some(line) if line.starts_with(expected) => {
            Ok(line[expected.len()..].trim_start().to_owned())
        }
        other => bail!("the followers' process said {other:?}, expected `{expected}`"),
    }
}

/// What the followers met: refusals and errors, counted as they happen.
#[derive(Default)]
struct Troubles {
    join_failures: u64,
    follow_errors: u64,
    first: Option<String>,
}

impl Troubles {
    fn note(troubles: &std::sync::Mutex<Troubles>, join: bool, message: String) {
        let mut t = troubles.lock().unwrap_or_else(|p| p.into_inner());
        if join {
            t.join_failures += 1;
        } else {
            t.follow_errors += 1;
        }
        t.first.get_or_insert(message);
    }
}

/// The child side of `fanout`: joins with each token read from stdin (`join_concurrency`
/// at a time), follows live, records when each follower applied each seq, and answers
/// `wait N` with `caught-up` once every follower reached N, and `report [[seq, commit µs],
/// …]` with the commit → applied latencies over all followers.
pub async fn fanout_followers(dir: &std::path::Path, join_concurrency: usize) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut tokens = Vec::new();
    while let Some(token) = lines.next_line().await? {
        if token.is_empty() {
            break;
        }
        tokens.push(token);
    }
    // One migrated database, copied for each follower: migrating a thousand files would
    // take the child longer than the joins.
    let template = dir.join("follower-template.db");
    let db = connect(&format!("sqlite://{}?mode=rwc", template.display())).await?;
    Migrator::up(&db, None).await?;
    db.close().await?;

    let troubles = Arc::new(std::sync::Mutex::new(Troubles::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(join_concurrency.max(1)));
    let mut joins = tokio::task::JoinSet::new();
    for (n, token) in tokens.into_iter().enumerate() {
        let slots = Arc::clone(&slots);
        let troubles = Arc::clone(&troubles);
        let file = dir.join(format!("f{n}.db"));
        let template = template.clone();
        joins.spawn(async move {
            let _slot = slots.acquire_owned().await.ok()?;
            let joined = async {
                std::fs::copy(&template, &file)?;
                let url = format!("sqlite://{}?mode=rwc", file.display());
                let library = net::join(&url, &token, Some(&format!("f{n}"))).await?;
                let transport = net::transport(&library, None).await?;
                let follower = library.follower()?;
                Ok::<_, anyhow::Error>((library, follower, transport))
            }
            .await;
            match joined {
                Ok((library, follower, transport)) => {
                    let follow = follower.start_following(transport, FollowConfig::default());
                    Some((library, follow))
                }
                Err(e) => {
                    Troubles::note(&troubles, true, format!("f{n} join: {e:#}"));
                    None
                }
            }
        });
    }
    let mut follows = Vec::new();
    while let Some(joined) = joins.join_next().await {
        if let Some(pair) = joined? {
            follows.push(pair);
        }
    }
    // Every apply, with when it happened; and every error a follow loop reports.
    let mut watchers = tokio::task::JoinSet::new();
    let mut applied_at = Vec::with_capacity(follows.len());
    for (n, (_, follow)) in follows.iter().enumerate() {
        let times = Arc::new(std::sync::Mutex::new(Vec::<(u64, i64)>::new()));
        // The newest position recorded: the loop's status moves just before its event is
        // sent, so a report waits for this too.
        let (recorded, recorded_rx) = tokio::sync::watch::channel(0u64);
        applied_at.push((Arc::clone(&times), recorded_rx));
        let mut events = follow.subscribe();
        let troubles_events = Arc::clone(&troubles);
        watchers.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let at = unix_micros();
                        times
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((event.position.0, at));
                        recorded.send_replace(event.position.0);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let message = format!("f{n}: {missed} apply events missed");
                        Troubles::note(&troubles_events, false, message);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let troubles = Arc::clone(&troubles);
        let status = follow.watch_status();
        watchers.spawn(async move {
            let mut status = status;
            let mut failing = false;
            loop {
                let error = status.borrow_and_update().last_error.clone();
                match error {
                    Some(message) if !failing => {
                        failing = true;
                        Troubles::note(&troubles, false, format!("f{n} follow: {message}"));
                    }
                    Some(_) => {}
                    None => failing = false,
                }
                if status.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    println!("joined {}", follows.len());

    while let Some(line) = lines.next_line().await? {
        if let Some(target) = line.strip_prefix("wait ") {
            let target = Seq(target.trim().parse()?);
            for (_, follow) in &follows {
                follow
                    .wait_for(FANOUT_PHASE_TIMEOUT, |s| s.position >= target)
                    .await
                    .context("a follower did not catch up")?;
            }
            println!("caught-up");
        } else if let Some(commits) = line.strip_prefix("report ") {
            let commits: Vec<(u64, i64)> = serde_json::from_str(commits)?;
            let last = commits.iter().map(|&(seq, _)| seq).max().unwrap_or(0);
            let mut latencies = Vec::with_capacity(commits.len() * applied_at.len());
            let mut missing = 0u64;
            for (times, recorded) in &applied_at {
                let mut recorded = recorded.clone();
                // Missing samples are counted below; a bounded wait is enough here.
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    recorded.wait_for(|&position| position >= last),
                )
                .await;
                let times = times.lock().unwrap_or_else(|p| p.into_inner());
                for &(seq, committed) in &commits {
                    // The first apply that reached the seq.
                    match times.iter().find(|(position, _)| *position >= seq) {
                        Some(&(_, at)) => latencies.push((at - committed) as f64 / 1e3),
                        None => missing += 1,
                    }
                }
            }
            latencies.sort_by(f64::total_cmp);
            let troubles = troubles.lock().unwrap_or_else(|p| p.into_inner());
            println!(
                "report {}",
                json!({
                    "samples": latencies.len(),
                    "missing": missing,
                    "p50_ms": percentile(&latencies, 50.0),
                    "p99_ms": percentile(&latencies, 99.0),
                    "max_ms": latencies.last(),
                    "cpu_seconds": cpu_seconds(),
                    "rss_kib": rss_kib(),
                    "join_failures": troubles.join_failures,
                    "follow_errors": troubles.follow_errors,
                    "first_error": troubles.first,
                })
            );
        }
    }
    watchers.abort_all();
    for (_, follow) in follows {
        follow.stop().await;
    }
    Ok(())
}

/// What `bench scaleout` is asked to do.
#[derive(Clone, Debug)]
pub struct ScaleoutOptions {
    /// The PostgreSQL server (a URL): a fresh database is made and dropped per run.
    pub server: String,
    /// Server process counts to compare, one run each (1, 2, 3).
    pub processes: Vec<usize>,
    /// Live followers (read access, each on its own SQLite file, in this process), spread
    /// over the server processes.
    pub followers: usize,
    /// Live writes, one per transaction, timed from commit to applied on every follower.
    pub writes: u64,
    /// Entries in the log the pullers read.
    pub entries: u64,
    /// Concurrent pullers, spread over the server processes, each reading the whole log
    /// (pull only: nothing is applied, so the servers and the database are what is timed).
    pub pullers: usize,
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `example-app --db URL serve` processes, killed when dropped.
struct ServeProcesses {
    children: Vec<tokio::process::Child>,
    addresses: Vec<String>,
}

impl ServeProcesses {
    async fn start(url: &str, count: usize) -> Result<ServeProcesses> {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut children = Vec::with_capacity(count);
        let mut addresses = Vec::with_capacity(count);
        for _ in 0..count {
            let mut child = tokio::process::Command::new(std::env::current_exe()?)
                .args(["--db", url, "serve", "--listen", "127.0.0.1:0"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a serve process")?;
            let mut lines = BufReader::new(child.stdout.take().context("serve stdout")?).lines();
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .context("a serve process did not start in time")??
                .unwrap_or_default();
            let address = line
                .strip_prefix("listening on ")
                .with_context(|| format!("a serve process said {line:?}"))?
                .to_owned();
            children.push(child);
            addresses.push(address);
        }
        Ok(ServeProcesses {
            children,
            addresses,
        })
    }

    /// Each process's CPU seconds so far.
    fn cpu(&self) -> Vec<Option<f64>> {
        self.children
            .iter()
            .map(|c| c.id().and_then(cpu_seconds_of))
            .collect()
    }

    /// The addresses starting at process `i % n` (a follower's order: its own first).
    fn order_for(&self, i: usize) -> Vec<String> {
        let mut order = self.addresses.clone();
        let turn = i % order.len().max(1);
        order.rotate_left(turn);
        order
    }
}

fn cpu_spent(after: &[Option<f64>], before: &[Option<f64>]) -> Vec<Option<f64>> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.zip(*b).map(|(a, b)| a - b))
        .collect()
}

/// Several `serve` processes on one PostgreSQL database (issue 13 part 5), one run per
/// process count, side by side: live followers spread over the processes, each write
/// timed from commit (in this process, a writer beside the servers) to applied on every
/// follower; then pull throughput, many pullers reading the whole log at once through
/// every process. Reports the followers each process served and its CPU.
pub async fn scaleout(options: &ScaleoutOptions) -> Result<serde_json::Value> {
    let mut runs = Vec::new();
    for &processes in &options.processes {
        runs.push(scaleout_run(options, processes.max(1)).await?);
    }
    Ok(json!({
        "bench": "scaleout",
        "followers": options.followers,
        "writes": options.writes,
        "entries": options.entries,
        "pullers": options.pullers,
        "runs": runs,
    }))
}

async fn scaleout_run(options: &ScaleoutOptions, processes: usize) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let url = crate::fresh_database(&options.server, dir.path()).await?;
    if !url.starts_with("postgres") {
        bail!("bench scaleout needs a PostgreSQL URL (--db postgres://…)");
    }
    let db = connect(&url).await?;
    Migrator::up(&db, None).await?;
    let leader = Library::create(db, "bench", registry()).await?;
    write_tags(&leader, 10, 10).await?;
    let servers = ServeProcesses::start(&url, processes).await?;
    let pin = leader.device_key().await?.fingerprint();

    // Live followers, follower i served first by process i % processes.
    let config = FollowConfig {
        // Live notices only: a poll must not explain a fast apply.
        poll_interval: Duration::from_secs(3_600),
        ..FollowConfig::default()
    };
    let mut follows = Vec::with_capacity(options.followers);
    let mut served_by = vec![0usize; processes];
    for i in 0..options.followers {
        let token = net::invite_at(
            &leader,
            Access::Read,
            Duration::from_secs(3_600),
            servers.order_for(i),
        )
        .await?;
        let file = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(format!("f{i}.db")).display()
        );
        let follower = net::join(&file, &token, Some(&format!("f{i}"))).await?;
        let transport = net::transport(&follower, None).await?;
        let connected = transport.watch_connected();
        let follow = follower
            .follower()?
            .start_following(transport, config.clone());
        follows.push((follower, follow, connected));
    }
    let latest = leader.latest_seq().await?;
    for (_, follow, _) in &follows {
        follow
            .wait_for(FANOUT_PHASE_TIMEOUT, |s| s.position >= latest)
            .await
            .context("a follower did not catch up")?;
    }
    for (_, _, connected) in &follows {
        let address = connected.borrow().clone();
        if let Some(p) = servers
            .addresses
            .iter()
            .position(|a| Some(a) == address.as_ref())
        {
            served_by[p] += 1;
        }
    }

    // Live writes: commit here, applied on every follower (through every process).
    let cpu_before = servers.cpu();
    let mut latencies = Vec::with_capacity(options.writes as usize);
    let live_started = Instant::now();
    for _ in 0..options.writes {
        write_tags(&leader, 1, 1).await?;
        let committed = Instant::now();
        let target = leader.latest_seq().await?;
        for (_, follow, _) in &follows {
            follow
                .wait_for(FANOUT_PHASE_TIMEOUT, |s| s.position >= target)
                .await
                .context("a follower did not apply a live write")?;
        }
        latencies.push(committed.elapsed().as_secs_f64() * 1e3);
    }
    let live_seconds = live_started.elapsed().as_secs_f64();
    let cpu_live = cpu_spent(&servers.cpu(), &cpu_before);
    for (follower, follow, _) in follows {
        follow.stop().await;
        follower.db().clone().close().await.ok();
    }
    latencies.sort_by(f64::total_cmp);

    // Pull throughput: the log grows to `entries`, then every puller reads all of it.
    write_tags(
        &leader,
        options.entries.saturating_sub(leader.latest_seq().await?.0),
        500,
    )
    .await?;
    let latest = leader.latest_seq().await?;
    let mut sessions = Vec::with_capacity(options.pullers);
    for i in 0..options.pullers {
        let invite = leader
            .leader()?
            .invite(Access::Read, Duration::from_secs(600))
            .await?;
        let key = sync_core::DeviceKey::generate()?;
        leader
            .leader()?
            .redeem_invite(&invite.secret, Access::Read, key.fingerprint(), None)
            .await?;
        let client = sync_transport::Client::new(key, sync_transport::ClientConfig::default());
        let (tip, _) = tokio::sync::watch::channel(Seq::ZERO);
        let address = &servers.addresses[i % processes];
        sessions.push(client.connect(address, pin, leader.id(), tip).await?);
    }
    let cpu_before = servers.cpu();
    let started = Instant::now();
    let mut pulls = tokio::task::JoinSet::new();
    for session in sessions {
        let library_id = leader.id();
        pulls.spawn(async move {
            let mut position = sync_core::Position::default();
            let mut entries = 0u64;
            while position.seq < latest {
                let response = session
                    .pull(&PullRequest::from_position(library_id, position))
                    .await?;
                entries += response.through(position.seq).0 - position.seq.0;
                position = response.end(position);
            }
            Ok::<_, anyhow::Error>(entries)
        });
    }
    let mut pulled = 0u64;
    while let Some(done) = pulls.join_next().await {
        pulled += done.context("a puller panicked")??;
    }
    let pull_seconds = started.elapsed().as_secs_f64();
    let cpu_pull = cpu_spent(&servers.cpu(), &cpu_before);
    drop(servers);
    leader.db().clone().close().await.ok();
    crate::drop_database(&url).await?;

    Ok(json!({
        "processes": processes,
        "followers_served_per_process": served_by,
        "live_writes": options.writes,
        "live_seconds": live_seconds,
        "commit_to_applied_on_all_p50_ms": percentile(&latencies, 50.0),
        "commit_to_applied_on_all_p99_ms": percentile(&latencies, 99.0),
        "commit_to_applied_on_all_max_ms": latencies.last(),
        "server_cpu_seconds_live": cpu_live,
        "log_entries": latest.0,
        "pullers": options.pullers,
        "entries_pulled": pulled,
        "pull_seconds": pull_seconds,
        "pull_entries_per_second": pulled as f64 / pull_seconds.max(f64::EPSILON),
        "server_cpu_seconds_pulling": cpu_pull,
    }))
}

/// A parent for `bench capture`'s delete of a parent with no children.
pub mod bench_parent {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "bench_parent")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// A child that the database deletes with its parent (`ON DELETE CASCADE`).
pub mod bench_child {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "bench_child")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub parent_id: Uuid,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::bench_parent::Entity",
            from = "Column::ParentId",
            to = "super::bench_parent::Column::Id",
            on_delete = "Cascade"
        )]
        Parent,
    }
}

/// The cost of the cascade lookup: deletes `count` parents that have no children, `batch`
/// per `Library::transaction` (through the `SyncTransaction`'s hooks), once with the child
/// model unregistered (no cascading relation names the parent: no lookup, as before
/// cascades were recorded) and once registered (one read of the children per delete,
/// plus a locking read of the parent on PostgreSQL/MySQL). Each run in a fresh database
/// from `fresh` (called once per run); the best of `rounds` per case, in seconds.
pub async fn cascade_lookup<F, Fut>(
    mut fresh: F,
    count: u64,
    batch: u64,
    rounds: u32,
) -> Result<(f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    use sea_orm::{ConnectionTrait, EntityTrait, Schema};
    let mut best = [f64::INFINITY; 2];
    for round in 0..rounds.max(1) {
        for i in 0..2 {
            // Alternate the order, so neither case always runs on a warmer machine.
            let with_child = (i + round as usize) % 2 == 1;
            let url = fresh().await?;
            let db = connect(&url).await?;
            Migrator::up(&db, None).await?;
            let schema = Schema::new(db.get_database_backend());
            db.execute(&schema.create_table_from_entity(bench_parent::Entity))
                .await?;
            db.execute(&schema.create_table_from_entity(bench_child::Entity))
                .await?;
            let mut models = registry().register::<bench_parent::Entity>()?;
            if with_child {
                models = models.register::<bench_child::Entity>()?;
            }
            let library = Library::create(db, "bench", models).await?;
            let ids: Vec<uuid::Uuid> = (0..count).map(|_| uuid::Uuid::now_v7()).collect();
            for chunk in ids.chunks(500) {
                let rows: Vec<bench_parent::ActiveModel> = chunk
                    .iter()
                    .map(|id| bench_parent::ActiveModel {
                        id: Set(*id),
                        name: Set(format!("parent {id}")),
                    })
                    .collect();
                library
                    .unrecorded(move |txn| {
                        Box::pin(async move {
                            bench_parent::Entity::insert_many(rows)
                                .exec_without_returning(txn.unguarded())
                                .await
                        })
                    })
                    .await?;
            }
            let started = Instant::now();
            for chunk in ids.chunks(batch.max(1) as usize) {
                let chunk = chunk.to_vec();
                library
                    .transaction(move |txn| {
                        Box::pin(async move {
                            for id in chunk {
                                bench_parent::ActiveModel {
                                    id: Set(id),
                                    ..Default::default()
                                }
                                .delete(txn)
                                .await?;
                            }
                            Ok::<_, sea_orm::DbErr>(())
                        })
                    })
                    .await?;
            }
            // On PostgreSQL the entries are numbered by the background sequencer.
            library.latest_seq().await?;
            let seconds = started.elapsed().as_secs_f64();
            let logged = library.read_log(Seq::ZERO, count + 1).await?.len() as u64;
            if logged != count {
                bail!("{logged} entries logged for {count} deletes");
            }
            best[usize::from(with_child)] = best[usize::from(with_child)].min(seconds);
            library.db().clone().close().await.ok();
            crate::drop_database(&url).await?;
        }
    }
    Ok((best[0], best[1]))
}
