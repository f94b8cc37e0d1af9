//! `example-app`: a media library that syncs. See `--help`.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use example_app::load::{LoadOptions, load};
use example_app::{Migrator, connect, drop_database, fresh_database, ops, registry};
use sea_orm_migration::MigratorTrait;
use sync_core::{Library, OpenError, Seq};

const DEFAULT_DB: &str = "sqlite://media-library.db?mode=rwc";

#[derive(Parser)]
#[command(
    name = "example-app",
    version,
    about = "A small media library that syncs with sync-core"
)]
struct Cli {
    /// Database URL: a SQLite file (`sqlite://FILE?mode=rwc`) or `postgres://…`.
    #[arg(long, global = true, default_value = DEFAULT_DB, env = "EXAMPLE_APP_DB")]
    db: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the schema, this device's identity and a library led by this device.
    Init {
        #[arg(long, default_value = "Media")]
        library_name: String,
    },
    /// Inserts a record, or updates it when the JSON carries an existing `id`; prints it.
    Put { model: String, json: String },
    /// Deletes a record.
    Delete { model: String, id: String },
    /// Prints a record as JSON; exits non-zero when it is absent.
    Get { model: String, id: String },
    /// Every synced model's rows, synced fields only, as one canonical JSON object.
    Dump,
    /// Log entries as JSON lines.
    Log {
        /// The first seq to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// A seeded random mix of writes over all models.
    Load {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Writes per transaction.
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// The same writes with capture switched off.
        #[arg(long)]
        no_sync: bool,
    },
    /// This device's role, library and position.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// A short showcase in a temp dir: writes on a leader, and the log they leave.
    Demo,
    /// Benchmarks; prints figures as JSON lines.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Follower apply: initial sync of `--count` changes over the in-process transport,
    /// against a SeaORM `insert_many` of the same rows in one transaction; and the
    /// process's peak memory. SQLite files in a temp dir.
    Apply {
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Entries per pull.
        #[arg(long, default_value_t = 1_000)]
        batch: u32,
    },
    /// Capture's cost: synced against unsynced writes of the same load, each in a fresh
    /// database on the server of `--db` (or a temp SQLite file when `--db` is SQLite).
    Capture {
        #[arg(long, default_value_t = 4000)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: u64,
        /// Writes per transaction; give it more than once for several runs.
        #[arg(long, default_values_t = [1, 100])]
        batch: Vec<u64>,
        /// Measured rounds per case (the best is reported).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn open(url: &str) -> Result<Library> {
    let db = connect(url).await?;
    match Library::open_default(db, registry()).await {
        Err(OpenError::NotMigrated(_)) | Err(OpenError::NoLibrary) => {
            bail!("{url} holds no library yet: run `example-app --db '{url}' init` first")
        }
        other => Ok(other?),
    }
}

async fn init(url: &str, name: &str) -> Result<Library> {
    let db = connect(url).await?;
    Migrator::up(&db, None)
        .await
        .context("cannot create the schema")?;
    match Library::open_default(db.clone(), registry()).await {
        Ok(_) => bail!("{url} already holds a library"),
        Err(OpenError::NoLibrary) => Ok(Library::create(db, name, registry()).await?),
        Err(e) => Err(e.into()),
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init { library_name } => {
            let library = init(&cli.db, &library_name).await?;
            println!(
                "created library {} led by this device {}",
                library.id(),
                library.device_id()
            );
        }
        Command::Put { model, json } => {
            let library = open(&cli.db).await?;
            print_json(&ops::put(&library, &model, &json).await?)?;
        }
        Command::Delete { model, id } => {
            let library = open(&cli.db).await?;
            ops::delete(&library, &model, &id).await?;
        }
        Command::Get { model, id } => {
            let library = open(&cli.db).await?;
            match ops::get(&library, &model, &id).await? {
                Some(record) => print_json(&record)?,
                None => {
                    eprintln!("error: no {model} with id {id}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Dump => {
            let library = open(&cli.db).await?;
            print_json(&library.dump().await?)?;
        }
        Command::Log { from, limit } => {
            let library = open(&cli.db).await?;
            for entry in library.read_log(Seq(from.saturating_sub(1)), limit).await? {
                print_json(&entry)?;
            }
        }
        Command::Load {
            count,
            concurrency,
            seed,
            batch,
            no_sync,
        } => {
            let library = open(&cli.db).await?;
            let report = load(
                &library,
                &LoadOptions {
                    count,
                    concurrency,
                    seed,
                    batch,
                    sync: !no_sync,
                },
            )
            .await?;
            print_json(&report)?;
        }
        Command::Status { json } => {
            let library = open(&cli.db).await?;
            let status = library.status().await?;
            if json {
                print_json(&status)?;
            } else {
                println!(
                    "{:?} of library {} (device {}), latest seq {}",
                    status.role, status.library_id, status.device_id, status.latest_seq
                );
            }
        }
        Command::Demo => demo().await?,
        Command::Bench {
            which: Bench::Apply { count, batch },
        } => bench_apply(count, batch).await?,
        Command::Bench {
            which:
                Bench::Capture {
                    count,
                    concurrency,
                    batch,
                    rounds,
                },
        } => {
            bench_capture(&cli.db, count, concurrency, &batch, rounds).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench_capture(
    url: &str,
    count: u64,
    concurrency: u64,
    batches: &[u64],
    rounds: u32,
) -> Result<()> {
    let dir = tempfile_dir()?;
    let backend = url.split(':').next().unwrap_or("sqlite").to_owned();
    for &batch in batches {
        let mut best = [f64::INFINITY; 2];
        for _ in 0..rounds.max(1) {
            // Alternate the order so that neither side always runs on a warmer machine.
            for (slot, sync) in [(0, false), (1, true)] {
                let fresh = fresh_database(url, dir.path()).await?;
                let library = init(&fresh, "bench").await?;
                let options = LoadOptions {
                    count,
                    concurrency,
                    seed: 7,
                    batch,
                    sync,
                };
                let report = load(&library, &options).await?;
                best[slot] = best[slot].min(report.seconds);
                library.db().clone().close().await.ok();
                drop_database(&fresh).await?;
            }
        }
        let [unsynced, synced] = best;
        print_json(&serde_json::json!({
            "bench": "capture",
            "backend": backend,
            "writes": count,
            "writes_per_txn": batch,
            "concurrency": concurrency,
            "unsynced_seconds": unsynced,
            "synced_seconds": synced,
            "unsynced_writes_per_second": count as f64 / unsynced,
            "synced_writes_per_second": count as f64 / synced,
            "synced_over_unsynced_time": synced / unsynced,
        }))?;
    }
    Ok(())
}

async fn demo() -> Result<()> {
    let dir = tempfile_dir()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("leader.db").display()
    );
    let library = init(&url, "Demo").await?;
    println!(
        "leader: library {} on {}",
        library.id(),
        dir.path().join("leader.db").display()
    );
    let disk = ops::put(
        &library,
        "volume",
        r#"{"name":"Backup disk","total_capacity":2000000000000,"mount_point":"/mnt/backup"}"#,
    )
    .await?;
    let disk_id = disk["id"].as_str().unwrap_or_default().to_owned();
    println!("put volume `Backup disk` (mount_point /mnt/backup stays on this device)");
    ops::put(
        &library,
        "volume",
        &format!(r#"{{"id":"{disk_id}","display_name":"Backups","is_mounted":true}}"#),
    )
    .await?;
    println!("renamed it to `Backups` (is_mounted changed too, but it is local)");
    ops::put(
        &library,
        "user_metadata",
        r#"{"tags":["holiday","2026"],"favorite":true}"#,
    )
    .await?;
    ops::put(&library, "temp_file", r#"{"path":"/tmp/thumb.jpg"}"#).await?;
    println!("put user_metadata with tags, and a temp_file (never synced)");
    let tag = ops::put(&library, "tag", r#"{"name":"to-delete"}"#).await?;
    ops::delete(&library, "tag", tag["id"].as_str().unwrap_or_default()).await?;
    println!("put and deleted a tag");
    let entries = library.read_log(Seq::ZERO, 100).await?;
    sync_core::verify_chain(Seq::ZERO, 0, &entries)?;
    println!(
        "the log holds {} entries, seq 1..={}, checksum chain verified:",
        entries.len(),
        entries.len()
    );
    for e in &entries {
        println!(
            "  seq {:>2}  {:<6} {:<13} {}  changed {:?}",
            e.seq,
            e.op.as_str(),
            e.model,
            e.record_id,
            e.changed
        );
    }
    let drift = library.audit().await?;
    println!("audit: {} records differ from the log", drift.len());

    let follower_path = dir.path().join("follower.db");
    let follower_db = connect(&format!("sqlite://{}?mode=rwc", follower_path.display())).await?;
    Migrator::up(&follower_db, None).await?;
    let follower = Library::join(
        follower_db,
        library.id(),
        library.device_id(),
        "Demo",
        registry(),
    )
    .await?;
    let transport = sync_core::InProcess::new(library.clone());
    let position = follower.catch_up(&transport, 2).await?;
    println!(
        "follower on {} pulled in batches of 2 (in process; QUIC is not built yet): position {}",
        follower_path.display(),
        position.seq
    );
    ops::put(&library, "tag", r#"{"name":"added later"}"#).await?;
    let position = follower.catch_up(&transport, 100).await?;
    println!(
        "one more write on the leader; the follower continues from its position to {}",
        position.seq
    );
    let (leader_data, follower_data) = (library.dump().await?, follower.dump().await?);
    if leader_data != follower_data {
        bail!("the follower's synced data differs from the leader's");
    }
    println!("leader and follower hold identical synced data");
    Ok(())
}

/// The process's peak resident memory so far, in KiB (Linux), if it can be read.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn bench_apply(count: u64, batch: u32) -> Result<()> {
    use example_app::models::tag;
    use sea_orm::{ActiveModelTrait, EntityTrait, Set, TransactionTrait};
    let dir = tempfile_dir()?;
    let leader = init(&fresh_database("sqlite", dir.path()).await?, "bench").await?;
    // The leader's log: `count` inserts of tags, written 1,000 per transaction.
    let mut written = 0;
    while written < count {
        let n = (count - written).min(1_000);
        leader
            .transaction(move |txn| {
                Box::pin(async move {
                    for i in 0..n {
                        tag::ActiveModel {
                            id: Set(uuid::Uuid::now_v7()),
                            name: Set(format!("tag {}", written + i)),
                            color: Set(None),
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
    let rss_before_sync = peak_rss_kib();

    let follower_url = fresh_database("sqlite", dir.path()).await?;
    let follower_db = connect(&follower_url).await?;
    Migrator::up(&follower_db, None).await?;
    let follower = Library::join(
        follower_db,
        leader.id(),
        leader.device_id(),
        "bench",
        registry(),
    )
    .await?;
    let started = std::time::Instant::now();
    follower
        .catch_up(&sync_core::InProcess::new(leader.clone()), batch)
        .await?;
    let apply_seconds = started.elapsed().as_secs_f64();
    let rss_after_sync = peak_rss_kib();

    // The practical limit: the same rows, insert_many in one transaction (chunks of 1,000
    // rows keep each statement under SQLite's bound-parameter limit).
    let rows = tag::Entity::find().all(leader.db()).await?;
    let baseline_db = connect(&fresh_database("sqlite", dir.path()).await?).await?;
    Migrator::up(&baseline_db, None).await?;
    let started = std::time::Instant::now();
    let txn = baseline_db.begin().await?;
    for chunk in rows.chunks(1_000) {
        let models: Vec<tag::ActiveModel> = chunk
            .iter()
            .map(|m| tag::ActiveModel {
                id: Set(m.id),
                name: Set(m.name.clone()),
                color: Set(m.color.clone()),
            })
            .collect();
        tag::Entity::insert_many(models)
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    let insert_many_seconds = started.elapsed().as_secs_f64();
    print_json(&serde_json::json!({
        "bench": "apply",
        "changes": count,
        "batch": batch,
        "apply_seconds": apply_seconds,
        "apply_changes_per_second": count as f64 / apply_seconds,
        "insert_many_seconds": insert_many_seconds,
        "insert_many_rows_per_second": count as f64 / insert_many_seconds,
        "apply_over_insert_many_throughput": insert_many_seconds / apply_seconds,
        "peak_rss_kib_before_sync": rss_before_sync,
        "peak_rss_kib_after_sync": rss_after_sync,
    }))?;
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().context("cannot make a temporary directory")
}
