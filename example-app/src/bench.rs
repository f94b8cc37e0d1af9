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
    let follow = follower.start_following(transport, config);
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
    quic_follower.catch_up(transport.as_ref(), batch).await?;
    let quic_seconds = started.elapsed().as_secs_f64();

    let local_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("local.db").display()
    );
    let local_follower = in_process_follower(&local_url, &leader).await?;
    let started = Instant::now();
    local_follower
        .catch_up(&InProcess::new(leader.clone()), batch)
        .await?;
    let in_process_seconds = started.elapsed().as_secs_f64();
    if leader.dump().await? != quic_follower.dump().await? {
        bail!("the QUIC follower does not match the leader");
    }

    // Bytes per change: the first full response, framed as sent and as plain JSON.
    let mut request = PullRequest::after(leader.id(), Seq::ZERO);
    request.limit = batch;
    let response = leader.serve_pull(&request).await?;
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

/// This process's CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One leader (this process) and `followers` live followers in a child process: the
/// leader's memory and CPU per follower while it streams `writes` writes to all of them.
pub async fn fanout(followers: usize, writes: u64) -> Result<serde_json::Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir()?;
    let (leader, server) = leader_in(dir.path()).await?;
    write_tags(&leader, 100, 100).await?;
    let rss_alone = rss_kib();
    let mut tokens = Vec::with_capacity(followers);
    for _ in 0..followers {
        tokens.push(net::invite(&leader, Access::Read, Duration::from_secs(600), None).await?);
    }
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "fanout-followers", "--dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the followers' process")?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
    for token in &tokens {
        stdin.write_all(format!("{token}\n").as_bytes()).await?;
    }
    // An empty line ends the tokens; then each line is a seq to wait for.
    let latest = leader.latest_seq().await?;
    stdin.write_all(format!("\n{latest}\n").as_bytes()).await?;
    expect_line(&mut lines, "caught-up").await?;
    let rss_connected = rss_kib();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for _ in 0..writes {
        write_tags(&leader, 1, 1).await?;
    }
    let latest = leader.latest_seq().await?;
    stdin.write_all(format!("{latest}\n").as_bytes()).await?;
    expect_line(&mut lines, "caught-up").await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    drop(stdin);
    let _ = child.wait().await;
    server.shutdown().await;
    let per_follower_kib = rss_connected
        .zip(rss_alone)
        .map(|(c, a)| c.saturating_sub(a) as f64 / followers as f64);
    Ok(json!({
        "bench": "fanout",
        "followers": followers,
        "writes": writes,
        "seconds": seconds,
        "leader_rss_kib_alone": rss_alone,
        "leader_rss_kib_with_followers": rss_connected,
        "leader_rss_kib_per_follower": per_follower_kib,
        "leader_cpu_seconds": cpu,
        "leader_cpu_ms_per_write_per_follower": cpu.map(|c| c * 1e3 / writes as f64 / followers as f64),
    }))
}

async fn expect_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    expected: &str,
) -> Result<()> {
    let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
        .await
        .context("the followers' process did not answer in time")??;
    match line {
        Some(line) if line == expected => Ok(()),
        other => bail!("the followers' process said {other:?}, expected `{expected}`"),
    }
}

/// The child side of `fanout`: joins with each token read from stdin, follows live, and
/// answers `caught-up` once every follower reached each seq it is given.
pub async fn fanout_followers(dir: &std::path::Path) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut follows = Vec::new();
    let mut libraries = Vec::new();
    while let Some(token) = lines.next_line().await? {
        if token.is_empty() {
            break;
        }
        let n = follows.len();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("f{n}.db")).display()
        );
        let library = net::join(&url, &token, Some(&format!("f{n}"))).await?;
        let transport = net::transport(&library, None).await?;
        follows.push(library.start_following(transport, FollowConfig::default()));
        libraries.push(library);
    }
    let follows = Arc::new(follows);
    while let Some(line) = lines.next_line().await? {
        let target = Seq(line.trim().parse()?);
        for follow in follows.iter() {
            follow
                .wait_for(Duration::from_secs(300), |s| s.position >= target)
                .await
                .context("a follower did not catch up")?;
        }
        println!("caught-up");
    }
    Ok(())
}
