//! Connecting, and making fresh databases for tests and benchmarks.

use anyhow::{Context, Result};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

/// Connects to `url` (`sqlite:…`, `postgres://…`, `mysql://…`). SQLite files get WAL mode,
/// so readers do not block the writer.
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(std::time::Duration::from_secs(5))
        .acquire_timeout(std::time::Duration::from_secs(10))
        .max_connections(32);
    // Every pooled SQLite connection gets WAL (readers never block the writer) and
    // NORMAL sync (durable at checkpoints, safe against application crashes).
    options.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10))
    });
    let db = Database::connect(options)
        .await
        .with_context(|| format!("cannot open database {url}"))?;
    Ok(db)
}

/// A new, empty database next to `base`: a file in `dir` for SQLite (`base` = "sqlite"), a
/// new database on the same server for PostgreSQL or MySQL URLs.
pub async fn fresh_database(base: &str, dir: &std::path::Path) -> Result<String> {
    let name = format!("sync_{}", uuid::Uuid::new_v4().simple());
    if base == "sqlite" || base.starts_with("sqlite:") {
        return Ok(format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("{name}.db")).display()
        ));
    }
    let admin = Database::connect(base)
        .await
        .with_context(|| format!("cannot reach database server {base}"))?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .context("cannot create a database")?;
    let (server, _) = match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |j| j + 2) => base.split_at(i),
        _ => (base, ""),
    };
    Ok(format!("{server}/{name}"))
}

/// Drops a database made by `fresh_database` on a server (a no-op for SQLite files, which go
/// with their directory).
pub async fn drop_database(url: &str) -> Result<()> {
    if url.starts_with("sqlite:") {
        return Ok(());
    }
    let (server, name) = url
        .rsplit_once('/')
        .context("the database URL names no database")?;
    let admin = Database::connect(server)
        .await
        .with_context(|| format!("cannot reach database server {server}"))?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .context("cannot drop the database")?;
    Ok(())
}
