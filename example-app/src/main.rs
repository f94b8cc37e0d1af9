//! `example-app`: a media library that syncs. See `--help`.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use example_app::load::{LoadOptions, load};
use example_app::net;
use example_app::{Migrator, connect, drop_database, fresh_database, ops, registry};
use sea_orm_migration::MigratorTrait;
use sync_core::{Access, FollowConfig, Library, OpenError, Resolution, Seq};

/// Stdout was closed by its reader: the command stops quietly, with success, like the
/// standard tools behind a pipe into `head`.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes one line to stdout. Unlike `println!`, a closed stdout is an error the command
/// ends with (quietly, see `StdoutClosed`), not a panic.
fn say_line(line: std::fmt::Arguments<'_>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// `println!` for the commands' output: `?`s the caller out when stdout is closed.
macro_rules! say {
    ($($arg:tt)*) => {
        say_line(format_args!($($arg)*))?
    };
}

/// `eprintln!` that never panics: a closed stderr loses the message, nothing more.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

const DEFAULT_DB: &str = "sqlite://media-library.db?mode=rwc";

/// The largest seq (and count of entries) a database can hold: seqs are stored as
/// signed 64-bit integers.
const SEQ_MAX: u64 = i64::MAX as u64;

/// Concurrent writers of `load` and `bench capture`: each is a task with a connection.
const WRITERS_MAX: u64 = 1_024;

/// Writes per transaction of `load` and `bench capture`.
const BATCH_MAX: u64 = 100_000;

/// Followers of `bench fanout`: each is a connection and a database file.
const FANOUT_FOLLOWERS_MAX: u64 = 1_000;

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
    /// `@FILE` reads the JSON from a file.
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
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=SEQ_MAX))]
        from: u64,
        /// How many entries at most.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=SEQ_MAX))]
        limit: u64,
    },
    /// A seeded random mix of writes over all models.
    Load {
        #[arg(long)]
        count: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=WRITERS_MAX))]
        concurrency: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Writes per transaction.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=BATCH_MAX))]
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
    /// Serves this device's library over QUIC until SIGINT/SIGTERM.
    Serve {
        /// Where to listen, `HOST:PORT` (port 0 picks a free one).
        #[arg(long, default_value = "0.0.0.0:7447")]
        listen: std::net::SocketAddr,
        /// Serve Prometheus metrics over HTTP on `HOST:PORT` (port 0 picks a free one);
        /// prints `metrics on ADDR`.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Prints a one-time join token for a new device (leader only).
    Invite {
        /// What the new device may do: `read`, or `write` (push its own changes).
        /// (`--role` is the old name, still accepted.)
        #[arg(long, alias = "role", value_enum, default_value_t = InviteAccess::Write)]
        access: InviteAccess,
        /// How long the token works: `90s`, `30m`, `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// The leader address the token advertises; give it several times (or a
        /// comma-separated list) for a leader serving from several processes, in the
        /// order to try them (default: every `serve` running for this library now, else
        /// where `serve` last listened).
        #[arg(long)]
        address: Vec<String>,
    },
    /// Sets up a fresh database as a follower of the library a token invites to.
    Join {
        token: String,
        /// A name for this device in the leader's device list.
        #[arg(long)]
        name: Option<String>,
    },
    /// Follows the leader: live until SIGINT/SIGTERM, or `--once`.
    Follow {
        /// The leader's address, when it changed since `join` (its key stays pinned);
        /// several, comma-separated, for a leader serving from several processes.
        #[arg(long)]
        leader: Option<String>,
        /// Pull until this device has the leader's latest seq as of now, then exit.
        #[arg(long)]
        once: bool,
        /// Serve Prometheus metrics over HTTP on `HOST:PORT` (port 0 picks a free one);
        /// prints `metrics on ADDR` first.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// The library's devices (leader).
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Revokes a device (leader): it is refused from now on, live connections too.
    Revoke { device_id: String },
    /// Promotes this write-role follower to leader, for a leader that is gone. Asking the
    /// other members for their votes over QUIC is not built yet: without a majority
    /// (two of three write members, say) it is refused, and `--force` promotes it alone,
    /// recorded as forced. Prints what only the lost leader held (`lost`).
    Promote {
        /// Promote without a majority of the write members' votes.
        #[arg(long)]
        force: bool,
    },
    /// Hands leadership to a write member (leader, while its `serve` runs; the target
    /// runs `serve` too): sequencing stops, the target catches up, then leads; this
    /// device follows it, and the other followers find it by themselves.
    Handoff {
        /// The device to lead from now on (see `devices`).
        device_id: String,
    },
    /// Open conflicts: `id`, model, record id, and both sides (`local`: the value kept,
    /// `remote`: the concurrent value set aside).
    Conflicts {
        #[arg(long)]
        json: bool,
    },
    /// Settles a conflict with one side, or with a value of your own; the resolution syncs.
    Resolve {
        id: String,
        /// Keep the value the library kept (`local`) or take the one set aside (`remote`).
        #[arg(
            long,
            value_enum,
            conflicts_with = "value",
            required_unless_present = "value"
        )]
        take: Option<Side>,
        /// The fields to set, as a JSON object (e.g. '{"name":"Photos"}').
        #[arg(long)]
        value: Option<String>,
    },
    /// Changes the leader could not store, set aside with the reason (leader: every
    /// device's; follower: its own). `--dismiss CHANGE_ID` forgets one once dealt with.
    Rejected {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        dismiss: Option<String>,
    },
    /// Sets a pulled entry this follower cannot store aside (the error names its seq):
    /// the entries after it go on; later entries of the same record wait behind it.
    Skip { seq: u64 },
    /// Parked entries: seq, model, record, why.
    Parked {
        #[arg(long)]
        json: bool,
    },
    /// Applies the parked entries again (after fixing what refused them).
    RetryParked,
    /// Forgets a parked entry for good: this device keeps its own version of the record.
    DropParked { seq: u64 },
    /// The one-command showcase: a leader and a follower in a temp dir, syncing over QUIC.
    Demo,
    /// Benchmarks; prints figures as JSON lines.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Copy, Clone, clap::ValueEnum)]
enum Side {
    Local,
    Remote,
}

#[derive(Copy, Clone, clap::ValueEnum)]
enum InviteAccess {
    Read,
    Write,
}

/// `90s`, `30m`, `24h`, `7d`, or plain seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 30m, 24h or 7d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3_600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("unknown unit in `{text}`: use s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

#[derive(Subcommand)]
enum Bench {
    /// Latency from commit on the leader to applied on a live follower, over loopback
    /// QUIC, one write at a time.
    Live {
        #[arg(long, default_value_t = 1_000)]
        writes: u64,
    },
    /// A planned handoff over loopback QUIC: a leader holding `--count` entries, `--followers`
    /// live followers (the first, with write access and a server of its own, is the
    /// target): how long `hand_off` takes, until the target leads, and until every other
    /// follower has applied a write made at the new leader.
    Handoff {
        #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
        followers: usize,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
    },
    /// Initial sync over QUIC against the in-process transport; bytes per change on the
    /// wire with and without compression.
    Catchup {
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value_t = 1_000)]
        batch: u32,
    },
    /// One leader, many live followers (in a child process, each on its own SQLite
    /// file): they join while the leader writes, catch up, then every write is timed from
    /// commit to applied on every follower. Fails if any follower is refused or meets an
    /// error. The leader's database is `--db` (`sqlite`, the default here: a file in a
    /// temp dir; or a server URL, on which a fresh database is made and dropped).
    Fanout {
        #[arg(long, default_value_t = 50, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=FANOUT_FOLLOWERS_MAX))]
        followers: usize,
        /// Timed writes, one per transaction.
        #[arg(long, default_value_t = 200)]
        writes: u64,
        /// Pause between writes, in milliseconds (also between the writes made while
        /// followers join).
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Followers joining at once.
        #[arg(long, default_value_t = 16)]
        join_concurrency: usize,
    },
    /// Several `serve` processes on one PostgreSQL database (`--db postgres://…`, on
    /// which a fresh database is made and dropped per run), one run per process count:
    /// live followers spread over the processes, each write timed from commit to applied
    /// on every follower, the followers each process served and its CPU; then pull
    /// throughput, pullers reading the whole log through every process at once.
    Scaleout {
        /// Server process counts, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        processes: Vec<usize>,
        /// Live followers (each its own SQLite file, in this process).
        #[arg(long, default_value_t = 12)]
        followers: usize,
        /// Live writes timed from commit to applied on every follower.
        #[arg(long, default_value_t = 50)]
        writes: u64,
        /// Entries in the log the pullers read.
        #[arg(long, default_value_t = 20_000)]
        entries: u64,
        /// Concurrent pullers (pull only, nothing applied).
        #[arg(long, default_value_t = 12)]
        pullers: usize,
    },
    /// The followers' side of `fanout` (started by it).
    #[command(hide = true)]
    FanoutFollowers {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 16)]
        join_concurrency: usize,
    },
    /// Follower apply: initial sync of `--count` changes over the in-process transport,
    /// against a SeaORM `insert_many` of the same rows in one transaction; and the
    /// process's peak memory. SQLite files in a temp dir.
    Apply {
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Entries per pull.
        #[arg(long, default_value_t = 1_000)]
        batch: u32,
        /// Rounds of the follower-only apply and of `insert_many`, alternating, each on a
        /// fresh database (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Capture's cost: synced against unsynced writes of the same load, each in a fresh
    /// database on the server of `--db` (or a temp SQLite file when `--db` is SQLite);
    /// synced through each write path (`Library::transaction` on its `DatabaseTransaction`,
    /// the guarded `SyncTransaction`, the connection handle's `begin`, lone handle writes).
    Capture {
        #[arg(long, default_value_t = 4000)]
        count: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=WRITERS_MAX))]
        concurrency: u64,
        /// Writes per transaction; give it more than once for several runs.
        #[arg(long, default_values_t = [1, 100], value_parser = clap::value_parser!(u64).range(1..=BATCH_MAX))]
        batch: Vec<u64>,
        /// Measured rounds per case (the best is reported).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Without RUST_LOG: this app's and the sync crates' warnings (a request the leader
    // could not answer, a follower's failed pull), every other crate's errors.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "error,sync_core=warn,sync_transport=warn,example_app=warn",
        )
    });
    // `EXAMPLE_APP_LOG_SPANS=1` also logs each span (pull, apply, push, take, …) as it
    // closes, with its fields and timing, at the level the filter lets through.
    let spans = if std::env::var_os("EXAMPLE_APP_LOG_SPANS").is_some() {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        // The reader of stdout has gone (`… | head`): it has seen all it wanted.
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            note!("error: {e:#}");
            // The library speaks of its API; this CLI's commands are ours to name.
            let unreachable = e.chain().any(|cause| {
                matches!(
                    cause.downcast_ref::<sync_transport::TransportError>(),
                    Some(sync_transport::TransportError::Unreachable { .. })
                )
            });
            if unreachable {
                note!(
                    "hint: is the leader running `serve`? If it moved, pass its new address \
                     (`follow --leader HOST:PORT`)"
                );
            }
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

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT"),
        _ = term.recv() => Ok(()),
    }
}

/// A progress bar on stderr when it is a terminal.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} seq {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    say!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init { library_name } => {
            let library = init(&cli.db, &library_name).await?;
            say!(
                "created library {} led by this device {}",
                library.id(),
                library.device_id()
            );
        }
        Command::Put { model, json } => {
            let library = open(&cli.db).await?;
            // `@FILE` reads the JSON from a file (values larger than an argument may be).
            let json = match json.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?,
                None => json,
            };
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
                    note!("error: no {model} with id {id}");
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
            let status = net::status(&library).await?;
            if json {
                print_json(&status)?;
            } else {
                say!("{}", net::describe(&status));
            }
        }
        Command::Conflicts { json } => {
            let library = open(&cli.db).await?;
            let conflicts = library.conflicts().await?;
            if json {
                print_json(&conflicts)?;
            } else if conflicts.is_empty() {
                say!("no open conflicts");
            } else {
                for c in &conflicts {
                    say!(
                        "{}  {} {}  local {}  remote {}",
                        c.id,
                        c.model,
                        c.record_id,
                        c.local,
                        c.remote
                    );
                }
            }
        }
        Command::Resolve { id, take, value } => {
            let library = open(&cli.db).await?;
            let resolution = match (take, value) {
                (_, Some(text)) => match serde_json::from_str(&text) {
                    Ok(serde_json::Value::Object(fields)) => Resolution::Value(fields),
                    _ => {
                        anyhow::bail!("--value takes a JSON object, e.g. '{{\"name\":\"Photos\"}}'")
                    }
                },
                (Some(Side::Local), None) => Resolution::TakeLocal,
                (Some(Side::Remote), None) => Resolution::TakeRemote,
                (None, None) => anyhow::bail!("say --take local|remote or --value JSON"),
            };
            library.resolve(&id, resolution).await?;
            say!("resolved {id}");
        }
        Command::Rejected { json, dismiss } => {
            let library = open(&cli.db).await?;
            let rejected = library.rejected().await?;
            if let Some(change_id) = dismiss {
                if !library.dismiss_rejected(&change_id).await? {
                    anyhow::bail!("no rejected change has id `{change_id}`");
                }
                say!("dismissed {change_id}");
            } else if json {
                print_json(&rejected)?;
            } else if rejected.is_empty() {
                say!("no rejected changes");
            } else {
                for r in &rejected {
                    say!(
                        "{}  {} {} {} by {}: {}",
                        r.change_id,
                        r.op,
                        r.model,
                        r.record_id,
                        r.device_id,
                        r.reason
                    );
                }
            }
        }
        Command::Skip { seq } => {
            let library = open(&cli.db).await?;
            library.follower()?.park(sync_core::Seq(seq)).await?;
            say!("entry {seq} will be parked when it is pulled next");
        }
        Command::Parked { json } => {
            let library = open(&cli.db).await?;
            let parked = library.parked().await?;
            if json {
                print_json(&parked)?;
            } else if parked.is_empty() {
                say!("no parked entries");
            } else {
                for p in &parked {
                    say!(
                        "{}  {} {}  {}",
                        p.seq,
                        p.model.as_deref().unwrap_or("(not pulled yet)"),
                        p.record_id.as_deref().unwrap_or(""),
                        p.reason
                    );
                }
            }
        }
        Command::RetryParked => {
            let library = open(&cli.db).await?;
            let retried = library.follower()?.retry_parked().await?;
            say!(
                "{} applied, {} still parked{}",
                retried.applied,
                retried.still_parked,
                retried
                    .first_failure
                    .map_or_else(String::new, |f| format!("; {f}"))
            );
        }
        Command::DropParked { seq } => {
            let library = open(&cli.db).await?;
            if !library.follower()?.drop_parked(sync_core::Seq(seq)).await? {
                anyhow::bail!("no entry {seq} is parked");
            }
            say!("dropped parked entry {seq}");
        }
        Command::Serve { listen, metrics } => {
            let library = open(&cli.db).await?;
            // Installed first: the server records from the moment it binds.
            let metrics = metrics.map(example_app::exporter::install).transpose()?;
            let server = net::serve(&library, listen).await?;
            // Other `serve` processes on this database serve the same library; `invite`
            // names every registered one.
            let registration = net::Registration::start(&library, &server).await?;
            say!("listening on {}", server.local_addr());
            if let Some(addr) = metrics {
                say!("metrics on {addr}");
            }
            // On a follower it follows the leader (and takes over when a handoff names
            // it); on the leader it carries out `handoff` requests.
            let supervisor = net::supervise(library.clone());
            shutdown_signal().await?;
            supervisor.abort();
            server.shutdown().await;
            registration.end().await?;
            // Followers' positions are written about once a second; keep the last ones.
            if let Ok(leader) = library.leader() {
                leader.flush_peer_positions().await?;
            }
            note!("stopped serving");
        }
        Command::Invite {
            access,
            ttl,
            address,
        } => {
            let library = open(&cli.db).await?;
            let access = match access {
                InviteAccess::Read => Access::Read,
                InviteAccess::Write => Access::Write,
            };
            say!("{}", net::invite_at(&library, access, ttl, address).await?);
        }
        Command::Join { token, name } => {
            let library = net::join(&cli.db, &token, name.as_deref()).await?;
            say!(
                "joined library {} ({}) as a follower with {} access",
                library.id(),
                library.name().await?,
                library.access().await?
            );
        }
        Command::Follow {
            leader,
            once,
            metrics,
        } => {
            if let Some(addr) = metrics {
                say!("metrics on {}", example_app::exporter::install(addr)?);
            }
            let library = open(&cli.db).await?;
            let transport = net::transport(&library, leader.as_deref()).await?;
            if once {
                let bar = progress_bar();
                let position = net::sync_once(&library, &transport, |at, target| {
                    if let Some(bar) = &bar {
                        bar.set_length(target);
                        bar.set_position(at);
                    }
                })
                .await;
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                say!("in sync at seq {}", position?.seq);
            } else {
                let mut connected = transport.watch_connected();
                let known = transport.addresses_known();
                let follow = library
                    .follower()?
                    .start_following(transport, FollowConfig::default());
                note!("following; Ctrl-C stops");
                let mut events = follow.subscribe();
                let signal = shutdown_signal();
                tokio::pin!(signal);
                let mut printed = Ok(());
                loop {
                    tokio::select! {
                        result = &mut signal => { result?; break; }
                        Ok(()) = connected.changed() => {
                            let address = connected.borrow_and_update().clone();
                            if let Some(address) = address {
                                // Which of the leader's addresses serves it now; the next
                                // `follow` tries it first (not a dead one it moved from).
                                net::remember_first_address(&library, &known, &address).await?;
                                let line = say_line(format_args!("connected to {address}"));
                                if let Err(e) = line {
                                    printed = Err(e);
                                    break;
                                }
                            }
                        }
                        event = events.recv() => match event {
                            Ok(applied) => {
                                let line = say_line(format_args!(
                                    "applied {} changes, now at seq {}",
                                    applied.records.len(),
                                    applied.position
                                ));
                                // A closed stdout ends following, cleanly.
                                if let Err(e) = line {
                                    printed = Err(e);
                                    break;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        },
                    }
                }
                let status = follow.status();
                follow.stop().await;
                net::record_follow_status(&library, &status).await?;
                printed?;
            }
        }
        Command::Devices { json } => {
            let library = open(&cli.db).await?;
            let members = library.members().await?;
            let epoch = library.epoch();
            if json {
                print_json(&members)?;
            } else {
                for m in members {
                    say!(
                        "{}  {:<6} {:<8} position {}  epoch {epoch}  {}",
                        m.device_id,
                        m.access,
                        if m.revoked_at_ms.is_some() {
                            "revoked"
                        } else {
                            "active"
                        },
                        m.position.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                        m.name.unwrap_or_default()
                    );
                }
            }
        }
        Command::Revoke { device_id } => {
            let library = open(&cli.db).await?;
            let device = device_id
                .parse()
                .with_context(|| format!("`{device_id}` is not a device id (see `devices`)"))?;
            library.leader()?.revoke(device).await?;
            say!("revoked {device_id}");
        }
        Command::Promote { force } => {
            let library = open(&cli.db).await?;
            let promotion = library
                .follower()?
                .promote(&[], sync_core::PromoteOptions { force })
                .await?;
            print_json(&promotion)?;
            match promotion.lost {
                Some((from, through)) => say!(
                    "promoted: this device leads epoch {}; seqs {from}..={through} were held \
                     only by the lost leader",
                    promotion.epoch
                ),
                None => say!(
                    "promoted: this device leads epoch {}; nothing is known to be lost",
                    promotion.epoch
                ),
            }
        }
        Command::Handoff { device_id } => {
            let library = open(&cli.db).await?;
            say!("{}", net::hand_off(&library, &device_id).await?);
        }
        Command::Demo => demo().await?,
        Command::Bench {
            which:
                Bench::Apply {
                    count,
                    batch,
                    rounds,
                },
        } => bench_apply(count, batch, rounds).await?,
        Command::Bench {
            which: Bench::Live { writes },
        } => print_json(&example_app::bench::live(writes).await?)?,
        Command::Bench {
            which: Bench::Catchup { count, batch },
        } => print_json(&example_app::bench::catchup(count, batch).await?)?,
        Command::Bench {
            which: Bench::Handoff { followers, count },
        } => print_json(&example_app::bench::handoff(followers, count).await?)?,
        Command::Bench {
            which:
                Bench::Fanout {
                    followers,
                    writes,
                    interval_ms,
                    join_concurrency,
                },
        } => {
            // The app's default database is a file in the working directory; the bench
            // makes its own, on SQLite unless a server is named.
            let leader_db = if cli.db == DEFAULT_DB {
                "sqlite".to_owned()
            } else {
                cli.db.clone()
            };
            let options = example_app::bench::FanoutOptions {
                leader_db,
                followers,
                writes,
                interval: std::time::Duration::from_millis(interval_ms),
                join_concurrency,
            };
            print_json(&example_app::bench::fanout(&options).await?)?;
        }
        Command::Bench {
            which:
                Bench::Scaleout {
                    processes,
                    followers,
                    writes,
                    entries,
                    pullers,
                },
        } => {
            if !cli.db.starts_with("postgres") {
                anyhow::bail!(
                    "bench scaleout needs a PostgreSQL server: pass --db postgres://USER@HOST/DB"
                );
            }
            let options = example_app::bench::ScaleoutOptions {
                server: cli.db.clone(),
                processes,
                followers,
                writes,
                entries,
                pullers,
            };
            print_json(&example_app::bench::scaleout(&options).await?)?;
        }
        Command::Bench {
            which:
                Bench::FanoutFollowers {
                    dir,
                    join_concurrency,
                },
        } => example_app::bench::fanout_followers(&dir, join_concurrency).await?,
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
    use example_app::load::{WritePath, load_via};
    let dir = tempfile_dir()?;
    let backend = url.split(':').next().unwrap_or("sqlite").to_owned();
    for &batch in batches {
        // Lone writes are one per transaction: compared only with a batch of one.
        let mut paths = vec![
            WritePath::Unsynced,
            WritePath::Transaction,
            WritePath::Guarded,
            WritePath::Handle,
        ];
        if batch == 1 {
            paths.push(WritePath::Lone);
        }
        let mut best = vec![f64::INFINITY; paths.len()];
        for round in 0..rounds.max(1) {
            // Rotate the order so that no path always runs on a warmer machine.
            for i in 0..paths.len() {
                let slot = (i + round as usize) % paths.len();
                let fresh = fresh_database(url, dir.path()).await?;
                let library = init(&fresh, "bench").await?;
                let options = LoadOptions {
                    count,
                    concurrency,
                    seed: 7,
                    batch,
                    sync: true,
                };
                let report = load_via(&library, &options, paths[slot]).await?;
                best[slot] = best[slot].min(report.seconds);
                library.db().clone().close().await.ok();
                drop_database(&fresh).await?;
            }
        }
        let unsynced = best[0];
        let synced = best[1];
        let mut paths_json = serde_json::Map::new();
        for (path, seconds) in paths.iter().zip(&best) {
            paths_json.insert(
                serde_json::to_value(path)?
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                serde_json::json!({
                    "seconds": seconds,
                    "writes_per_second": count as f64 / seconds,
                    "over_unsynced_time": seconds / unsynced,
                }),
            );
        }
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
            "paths": paths_json,
        }))?;
        // The cascade lookup's cost on a delete of a parent with no children, side by
        // side: no cascading relation names the parent (as before cascades were recorded)
        // against one that does.
        let (before, lookup) = example_app::bench::cascade_lookup(
            || fresh_database(url, dir.path()),
            count,
            batch,
            rounds,
        )
        .await?;
        print_json(&serde_json::json!({
            "bench": "capture_cascade_lookup",
            "backend": backend,
            "deletes": count,
            "deletes_per_txn": batch,
            "no_dependents_seconds": before,
            "cascade_lookup_seconds": lookup,
            "no_dependents_deletes_per_second": count as f64 / before,
            "cascade_lookup_deletes_per_second": count as f64 / lookup,
            "lookup_over_no_dependents_time": lookup / before,
        }))?;
    }
    Ok(())
}

async fn demo() -> Result<()> {
    let dir = tempfile_dir()?;
    let leader_path = dir.path().join("leader.db");
    let leader = init(
        &format!("sqlite://{}?mode=rwc", leader_path.display()),
        "Demo",
    )
    .await?;
    let server = net::serve(&leader, "127.0.0.1:0".parse()?).await?;
    say!(
        "leader   {} serves library {} over QUIC on {}",
        leader.device_id(),
        leader.id(),
        server.local_addr()
    );
    let token = net::invite(
        &leader,
        Access::Write,
        std::time::Duration::from_secs(600),
        None,
    )
    .await?;
    let follower_path = dir.path().join("follower.db");
    let follower = net::join(
        &format!("sqlite://{}?mode=rwc", follower_path.display()),
        &token,
        Some("demo follower"),
    )
    .await?;
    say!(
        "follower {} joined with a one-time invite (leader key pinned)",
        follower.device_id()
    );
    // It serves too, as every device does (nothing until it leads): its pulls tell the
    // leader where, for a handoff later.
    let follower_server = net::serve(&follower, "127.0.0.1:0".parse()?).await?;
    let transport = net::transport(&follower, None).await?;
    let follow = follower
        .follower()?
        .start_following(transport, FollowConfig::default());
    let mut events = follow.subscribe();

    let disk = ops::put(
        &leader,
        "volume",
        r#"{"name":"Backup disk","total_capacity":2000000000000,"mount_point":"/mnt/backup"}"#,
    )
    .await?;
    let disk_id = disk["id"].as_str().unwrap_or_default().to_owned();
    let meta = ops::put(
        &leader,
        "user_metadata",
        r#"{"tags":["holiday","2026"],"favorite":true}"#,
    )
    .await?;
    let meta_id = meta["id"].as_str().unwrap_or_default().to_owned();
    ops::put(&leader, "temp_file", r#"{"path":"/tmp/thumb.jpg"}"#).await?;
    say!("leader   put a volume, user_metadata and a temp_file (temp files never sync)");
    let latest = leader.latest_seq().await?;
    let caught_up = follow
        .wait_for(std::time::Duration::from_secs(30), |s| s.position >= latest)
        .await;
    if caught_up.is_none() {
        bail!(
            "the follower did not reach seq {latest}: {:?}",
            follow.status().last_error
        );
    }
    while let Ok(applied) = events.try_recv() {
        let models: Vec<&str> = applied.records.iter().map(|(m, _)| m.as_str()).collect();
        say!(
            "follower applied {} at once, now at seq {}",
            models.join(", "),
            applied.position
        );
    }
    ops::put(
        &leader,
        "volume",
        &format!(r#"{{"id":"{disk_id}","display_name":"Backups","is_mounted":true}}"#),
    )
    .await?;
    let started = std::time::Instant::now();
    let latest = leader.latest_seq().await?;
    follow
        .wait_for(std::time::Duration::from_secs(30), |s| s.position >= latest)
        .await
        .ok_or_else(|| anyhow::anyhow!("the follower did not apply the rename"))?;
    say!(
        "leader   renamed the volume; the follower had it {:.1} ms later (live notice over QUIC)",
        started.elapsed().as_secs_f64() * 1e3
    );

    // The leader goes away; the follower keeps working, and so does the leader.
    let address = server.local_addr();
    server.shutdown().await;
    say!("leader   goes offline");
    ops::put(&follower, "tag", r#"{"name":"written offline"}"#).await?;
    ops::put(
        &follower,
        "user_metadata",
        &format!(r#"{{"id":"{meta_id}","tags":["holiday","2026","beach"]}}"#),
    )
    .await?;
    ops::put(
        &leader,
        "user_metadata",
        &format!(r#"{{"id":"{meta_id}","tags":["holiday","2026","family"]}}"#),
    )
    .await?;
    say!(
        "follower keeps writing: a new tag and the tag \"beach\" ({} changes wait in its outbox); \
         the leader meanwhile tags \"family\"",
        follower.outbox_len().await?
    );
    let server = net::serve(&leader, address).await?;
    follow.sync_now();
    let started = std::time::Instant::now();
    // Done when the outbox is empty and the follower has everything the leader has; the
    // loop's status says when to look again.
    let deadline = started + std::time::Duration::from_secs(60);
    let status = loop {
        let status = follow.status();
        let outbox = follower.outbox_len().await?;
        let leader_latest = leader.latest_seq().await?;
        if outbox == 0 && leader_latest > latest && status.position >= leader_latest {
            break status;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the follower did not push and catch up after the leader came back: {:?}",
                status.last_error
            );
        }
        follow
            .wait_for(std::time::Duration::from_millis(50), |now| now != &status)
            .await;
    };
    let tags = ops::get(&leader, "user_metadata", &meta_id)
        .await?
        .and_then(|m| m.get("tags").cloned())
        .unwrap_or_default();
    say!(
        "leader   back on {address}: the follower pushed its outbox and pulled, {:.0} ms later at \
         seq {}; tags merged as a set: {tags}",
        started.elapsed().as_secs_f64() * 1e3,
        status.position
    );
    // Leadership moves: the follower (serving all along) takes over; the old leader follows it.
    let handed = leader
        .leader()?
        .hand_off(follower.device_id(), std::time::Duration::from_secs(30))
        .await?;
    follow
        .wait_for(std::time::Duration::from_secs(30), |s| {
            s.state == sync_core::FollowState::Leading
        })
        .await
        .ok_or_else(|| anyhow::anyhow!("the follower did not take the leadership over"))?;
    follow.stop().await;
    let old_follow = leader.follower()?.start_following(
        net::transport(&leader, None).await?,
        FollowConfig::default(),
    );
    ops::put(&leader, "tag", r#"{"name":"written by the old leader"}"#).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let latest = loop {
        let status = old_follow.status();
        let latest = follower.latest_seq().await?;
        if leader.outbox_len().await? == 0
            && latest > handed.record_seq
            && status.position >= latest
        {
            break latest;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the old leader did not follow the new one: {:?}",
                status.last_error
            );
        }
        old_follow
            .wait_for(std::time::Duration::from_millis(50), |now| now != &status)
            .await;
    };
    say!(
        "handoff: the follower leads in epoch {} (move record at seq {}); the old leader follows \
         it on {}, and its new tag went through the new leader",
        handed.epoch,
        handed.record_seq,
        follower_server.local_addr()
    );
    old_follow.stop().await;
    follower_server.shutdown().await;
    server.shutdown().await;
    let (leader_data, follower_data) = (leader.dump().await?, follower.dump().await?);
    if leader_data != follower_data {
        bail!("the follower's synced data differs from the leader's");
    }
    let mount = ops::get(&follower, "volume", &disk_id)
        .await?
        .and_then(|m| {
            m.get("mount_point")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    say!(
        "both hold identical synced data (seq {latest}); the volume's mount_point is {:?} on \
         the follower, /mnt/backup on the leader: local fields stay on their device",
        mount
    );
    Ok(())
}

/// The process's peak resident memory so far, in KiB (Linux), if it can be read.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn bench_apply(count: u64, batch: u32, rounds: u32) -> Result<()> {
    use example_app::bench::in_process_follower;
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

    let follower =
        in_process_follower(&fresh_database("sqlite", dir.path()).await?, &leader).await?;
    let started = std::time::Instant::now();
    follower
        .follower()?
        .catch_up(&sync_core::InProcess::new(leader.leader()?), batch)
        .await?;
    let apply_seconds = started.elapsed().as_secs_f64();
    let rss_after_sync = peak_rss_kib();

    // The follower's side alone: the leader serves every batch first, then fresh
    // followers apply them as they would arrive from a leader faster than they are
    // (`apply_all`, as `catch_up` does with what has arrived).
    let started = std::time::Instant::now();
    let mut responses = Vec::new();
    let mut at = sync_core::Position::default();
    while at.seq.0 < count {
        let mut request = sync_core::PullRequest::from_position(leader.id(), at);
        request.limit = batch;
        let response = leader.leader()?.serve_pull(&request).await?;
        let through = response.end(at);
        if through.seq == at.seq {
            bail!("the leader served nothing after seq {}", at.seq);
        }
        responses.push(response);
        at = through;
    }
    let after = at.seq;
    let serve_seconds = started.elapsed().as_secs_f64();

    // Against the practical limit: the same rows, insert_many in one transaction (chunks
    // of 1,000 rows keep each statement under SQLite's bound-parameter limit). The two
    // alternate, round by round, so that both see the machine in the same state; the
    // ratio is the median of the rounds' ratios.
    let rows = tag::Entity::find().all(leader.db()).await?;
    let (mut apply_only_seconds, mut insert_many_seconds, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    // Every round's databases stay open until the end: closing one checkpoints its WAL,
    // work that would land in the next round's timing.
    let (mut followers, mut baselines) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let follower =
            in_process_follower(&fresh_database("sqlite", dir.path()).await?, &leader).await?;
        let batches = responses.clone();
        let started = std::time::Instant::now();
        let applied = follower.follower()?.apply_all(Seq::ZERO, batches).await?;
        let applying = started.elapsed().as_secs_f64();
        if applied.position.seq != after {
            bail!("applied up to {} of {after}", applied.position.seq);
        }

        let db = connect(&fresh_database("sqlite", dir.path()).await?).await?;
        Migrator::up(&db, None).await?;
        let started = std::time::Instant::now();
        let txn = db.begin().await?;
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
        let inserting = started.elapsed().as_secs_f64();
        followers.push(follower);
        baselines.push(db);
        apply_only_seconds.push(applying);
        insert_many_seconds.push(inserting);
        ratios.push(inserting / applying);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let apply_only_ratio = median(ratios);
    let (apply_only_seconds, insert_many_seconds) =
        (median(apply_only_seconds), median(insert_many_seconds));
    print_json(&serde_json::json!({
        "bench": "apply",
        "changes": count,
        "batch": batch,
        "rounds": rounds,
        "apply_seconds": apply_seconds,
        "apply_changes_per_second": count as f64 / apply_seconds,
        "insert_many_seconds": insert_many_seconds,
        "insert_many_rows_per_second": count as f64 / insert_many_seconds,
        "apply_over_insert_many_throughput": insert_many_seconds / apply_seconds,
        "serve_seconds": serve_seconds,
        "apply_only_seconds": apply_only_seconds,
        "apply_only_changes_per_second": count as f64 / apply_only_seconds,
        "apply_only_over_insert_many_throughput": apply_only_ratio,
        "peak_rss_kib_before_sync": rss_before_sync,
        "peak_rss_kib_after_sync": rss_after_sync,
    }))?;
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().context("cannot make a temporary directory")
}
