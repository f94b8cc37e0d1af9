//! Noticing commits that other processes make to a library's log, so that a leader tells
//! its followers about writes it did not make itself (the CLI's `put` beside a running
//! `serve`, or several app processes sharing one PostgreSQL).

use std::time::Duration;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
use sea_orm::sqlx;

use crate::Library;

/// PostgreSQL: the channel the sequencer notifies, inside its transaction, so the notice
/// is delivered when the new entries commit. The payload is the library id.
pub(crate) const NOTIFY_CHANNEL: &str = "sync_log";

/// SQLite: how often `PRAGMA data_version` is read. It costs no I/O: the connection
/// compares a counter in shared memory.
#[cfg(feature = "sqlite")]
const SQLITE_POLL: Duration = Duration::from_millis(5);

/// A fallback check of the log's tip, for a missed notice or a backend without notices.
const FALLBACK_POLL: Duration = Duration::from_millis(250);

/// A running watcher; dropping it stops it.
#[derive(Debug)]
pub struct CommitWatcher(tokio::task::JoinHandle<()>);

impl Drop for CommitWatcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Library {
    /// Starts watching this library's log for commits made by other processes; each one
    /// moves `watch_latest_seq`. This process's own commits move it without a watcher.
    pub fn watch_commits(&self) -> CommitWatcher {
        let library = self.clone();
        CommitWatcher(tokio::spawn(async move {
            match library.db.get_database_backend() {
                #[cfg(feature = "sqlite")]
                sea_orm::DbBackend::Sqlite => fell_back(&library, watch_sqlite(&library).await),
                #[cfg(feature = "postgres")]
                sea_orm::DbBackend::Postgres => fell_back(&library, watch_postgres(&library).await),
                // MySQL has no commit notice (and a backend's watcher needs its driver
                // feature): polling alone.
                _ => {}
            }
            loop {
                refresh(&library).await;
                tokio::time::sleep(FALLBACK_POLL).await;
            }
        }))
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn fell_back(library: &Library, outcome: Result<(), sqlx::Error>) {
    if let Err(e) = outcome {
        tracing::warn!(library = %library.id(), %e, "commit watcher fell back to polling");
    }
}

async fn refresh(library: &Library) {
    if let Err(e) = library.latest_seq().await {
        tracing::debug!(library = %library.id(), %e, "reading the log's tip failed");
    }
}

/// Returns only on an error; the caller falls back to polling.
///
/// The watcher opens its own connection, with the app's pool's options, instead of taking
/// one from the pool for good: `Database::connect(url)` gives SQLite a pool of one
/// connection, which a watcher holding it would take from every other reader and writer.
#[cfg(feature = "sqlite")]
async fn watch_sqlite(library: &Library) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    let options = library.db.get_sqlite_connection_pool().connect_options();
    let mut connection = options.connect().await?;
    let mut seen: Option<i64> = None;
    loop {
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut connection)
            .await?;
        if seen != Some(version) {
            seen = Some(version);
            refresh(library).await;
        }
        tokio::time::sleep(SQLITE_POLL).await;
    }
}

/// Returns only on an error; the caller falls back to polling.
///
/// The listener keeps its connection for as long as it listens: it takes it from a pool
/// of its own (as `PgListener::connect` does), made with the app's pool's options, so that
/// an app whose pool is small never loses a connection to it.
#[cfg(feature = "postgres")]
async fn watch_postgres(library: &Library) -> Result<(), sqlx::Error> {
    let options = library.db.get_postgres_connection_pool().connect_options();
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with((*options).clone())
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    let id = library.id().to_string();
    refresh(library).await;
    loop {
        match tokio::time::timeout(FALLBACK_POLL, listener.recv()).await {
            Ok(notice) => {
                if notice?.payload() == id {
                    refresh(library).await;
                }
            }
            Err(_elapsed) => refresh(library).await,
        }
    }
}
