//! `load`: a seeded random mix of inserts, updates and deletes over every model, through the
//! ordinary ActiveModel path, with several writers in parallel.

use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sea_orm::ActiveValue::{NotSet, Set, Unchanged};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, TransactionSession, TransactionTrait};
use serde::Serialize;
use sync_core::Library;
use uuid::Uuid;

use crate::models::{location, tag, temp_file, user_metadata, volume};

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Writes in all.
    pub count: u64,
    /// Writers in parallel.
    pub concurrency: u64,
    /// Seed of the random mix; writer `i` uses `seed + i`.
    pub seed: u64,
    /// Writes per transaction.
    pub batch: u64,
    /// False: the same writes with capture switched off (`Library::unrecorded`).
    pub sync: bool,
}

/// How a load's synced writes reach the database (`bench capture` compares them).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WritePath {
    /// `Library::unrecorded`: capture switched off.
    Unsynced,
    /// `Library::transaction`, writes on the SeaORM `DatabaseTransaction` inside it
    /// (`SyncTransaction::unguarded`): the hooks find the task-local scope; statements are
    /// not guarded.
    Transaction,
    /// `Library::transaction`, writes on the `SyncTransaction` itself: hooks find the scope
    /// by probing it, and every statement passes the hook-less write guard.
    Guarded,
    /// `Library::connection().begin()`, writes on the `SyncTransaction`, then `commit`.
    Handle,
    /// Lone writes on `Library::connection()`: each write its own transaction (the batch
    /// size is ignored).
    Lone,
}

/// What a load did and how long it took.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Writes made.
    pub writes: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Wall time.
    pub seconds: f64,
    /// `writes / seconds`.
    pub writes_per_second: f64,
    /// Whether capture was on.
    pub synced: bool,
}

#[derive(Copy, Clone, Debug)]
enum Kind {
    Location,
    Tag,
    Volume,
    UserMetadata,
    TempFile,
}

const KINDS: [Kind; 5] = [
    Kind::Location,
    Kind::Tag,
    Kind::Volume,
    Kind::UserMetadata,
    Kind::TempFile,
];

#[derive(Copy, Clone, Debug)]
enum Op {
    Insert(Kind, Uuid),
    Update(Kind, Uuid),
    Delete(Kind, Uuid),
}

/// Runs the load and reports.
pub async fn load(library: &Library, options: &LoadOptions) -> Result<LoadReport> {
    let path = if options.sync {
        WritePath::Transaction
    } else {
        WritePath::Unsynced
    };
    load_via(library, options, path).await
}

/// Runs the load through `path` (`options.sync` is ignored) and reports.
pub async fn load_via(
    library: &Library,
    options: &LoadOptions,
    path: WritePath,
) -> Result<LoadReport> {
    let started = Instant::now();
    let writers = options.concurrency.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let share = options.count / writers + u64::from(writer < options.count % writers);
        let library = library.clone();
        let options = options.clone();
        tasks.spawn(async move { write_share(&library, &options, path, writer, share).await });
    }
    let mut transactions = 0;
    while let Some(joined) = tasks.join_next().await {
        transactions += joined??;
    }
    // Until every entry is numbered (PostgreSQL numbers them in the background), the
    // writes are not in the log: that time counts.
    library.sequence().await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(LoadReport {
        writes: options.count,
        transactions,
        seconds,
        writes_per_second: options.count as f64 / seconds.max(f64::EPSILON),
        synced: path != WritePath::Unsynced,
    })
}

async fn write_share(
    library: &Library,
    options: &LoadOptions,
    path: WritePath,
    writer: u64,
    share: u64,
) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(options.seed.wrapping_add(writer));
    // The records this writer made and has not deleted, per kind.
    let mut live: [Vec<Uuid>; 5] = Default::default();
    let mut done = 0;
    let mut transactions = 0;
    let conn = library.connection();
    while done < share {
        let size = options.batch.max(1).min(share - done);
        let mut ops = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let k = rng.random_range(0..KINDS.len());
            let roll = rng.random_range(0..100);
            let op = match live[k].len() {
                0 => Op::Insert(KINDS[k], Uuid::now_v7()),
                _ if roll < 50 => Op::Insert(KINDS[k], Uuid::now_v7()),
                n if roll < 85 => Op::Update(KINDS[k], live[k][rng.random_range(0..n)]),
                n => Op::Delete(KINDS[k], live[k].swap_remove(rng.random_range(0..n))),
            };
            if let Op::Insert(_, id) = op {
                live[k].push(id);
            }
            ops.push((op, rng.random::<u32>()));
        }
        match path {
            WritePath::Unsynced => {
                library
                    .unrecorded(move |txn| Box::pin(apply_all(txn.unguarded(), ops)))
                    .await?
            }
            WritePath::Transaction => {
                library
                    .transaction(move |txn| Box::pin(apply_all(txn.unguarded(), ops)))
                    .await?
            }
            WritePath::Guarded => {
                library
                    .transaction(move |txn| Box::pin(apply_all(txn, ops)))
                    .await?
            }
            WritePath::Handle => {
                let txn = conn.begin().await?;
                apply_all(&txn, ops).await?;
                txn.commit().await?;
            }
            WritePath::Lone => apply_all(&conn, ops).await?,
        }
        done += size;
        transactions += 1;
    }
    Ok(transactions)
}

async fn apply_all<C: ConnectionTrait>(txn: &C, ops: Vec<(Op, u32)>) -> Result<(), DbErr> {
    for (op, salt) in ops {
        apply(txn, op, salt).await?;
    }
    Ok(())
}

async fn apply<C: ConnectionTrait>(txn: &C, op: Op, salt: u32) -> Result<(), DbErr> {
    match op {
        Op::Insert(Kind::Location, id) => {
            location::ActiveModel {
                id: Set(id),
                name: Set(format!("Location {salt}")),
                path: Set(format!("/media/{salt}")),
                indexed_files: Set(i64::from(salt % 10_000)),
            }
            .insert(txn)
            .await?;
        }
        Op::Update(Kind::Location, id) => {
            location::ActiveModel {
                id: Unchanged(id),
                indexed_files: Set(i64::from(salt)),
                ..Default::default()
            }
            .update(txn)
            .await?;
        }
        Op::Insert(Kind::Tag, id) => {
            tag::ActiveModel {
                id: Set(id),
                name: Set(format!("tag-{salt}")),
                color: Set(Some("#3366ff".into())),
            }
            .insert(txn)
            .await?;
        }
        Op::Update(Kind::Tag, id) => {
            tag::ActiveModel {
                id: Unchanged(id),
                color: Set(Some(format!("#{:06x}", salt & 0xff_ffff))),
                ..Default::default()
            }
            .update(txn)
            .await?;
        }
        Op::Insert(Kind::Volume, id) => {
            volume::ActiveModel {
                id: Set(id),
                name: Set(format!("Disk {salt}")),
                total_capacity: Set(1 << 40),
                is_tracked: Set(true),
                display_name: Set(None),
                color: Set(None),
                icon: Set(Some("hdd".into())),
                mount_point: Set(format!("/mnt/{salt}")),
                available_space: Set(i64::from(salt)),
                is_mounted: Set(true),
            }
            .insert(txn)
            .await?;
        }
        Op::Update(Kind::Volume, id) => {
            volume::ActiveModel {
                id: Unchanged(id),
                available_space: Set(i64::from(salt)),
                display_name: Set(Some(format!("Disk {salt}"))),
                ..Default::default()
            }
            .update(txn)
            .await?;
        }
        Op::Insert(Kind::UserMetadata, id) => {
            user_metadata::ActiveModel {
                id: Set(id),
                tags: Set(serde_json::json!([format!("t{}", salt % 7)])),
                notes: Set(None),
                favorite: Set(salt.is_multiple_of(2)),
            }
            .insert(txn)
            .await?;
        }
        Op::Update(Kind::UserMetadata, id) => {
            user_metadata::ActiveModel {
                id: Unchanged(id),
                notes: Set(Some(format!("note {salt}"))),
                ..Default::default()
            }
            .update(txn)
            .await?;
        }
        Op::Insert(Kind::TempFile, id) => {
            temp_file::ActiveModel {
                id: Set(id),
                path: Set(format!("/tmp/{salt}")),
                size: Set(i64::from(salt)),
            }
            .insert(txn)
            .await?;
        }
        Op::Update(Kind::TempFile, id) => {
            temp_file::ActiveModel {
                id: Unchanged(id),
                size: Set(i64::from(salt)),
                path: NotSet,
            }
            .update(txn)
            .await?;
        }
        Op::Delete(kind, id) => delete(txn, kind, id).await?,
    }
    Ok(())
}

async fn delete<C: ConnectionTrait>(txn: &C, kind: Kind, id: Uuid) -> Result<(), DbErr> {
    match kind {
        Kind::Location => {
            location::ActiveModel {
                id: Set(id),
                ..Default::default()
            }
            .delete(txn)
            .await?
        }
        Kind::Tag => {
            tag::ActiveModel {
                id: Set(id),
                ..Default::default()
            }
            .delete(txn)
            .await?
        }
        Kind::Volume => {
            volume::ActiveModel {
                id: Set(id),
                ..Default::default()
            }
            .delete(txn)
            .await?
        }
        Kind::UserMetadata => {
            user_metadata::ActiveModel {
                id: Set(id),
                ..Default::default()
            }
            .delete(txn)
            .await?
        }
        Kind::TempFile => {
            temp_file::ActiveModel {
                id: Set(id),
                ..Default::default()
            }
            .delete(txn)
            .await?
        }
    };
    Ok(())
}
