//! `add_sync_key`: gives an existing table with an integer primary key the sync key column
//! its `#[sync(key)]` field needs, filling it for the rows it already holds.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Adds the sync key column `column` (a UUID) to `table`, whose primary key is the integer
/// column `primary_key`, for a model that then marks the field `#[sync(key)]`:
///
/// 1. adds the column, nullable;
/// 2. fills every row that has none with a fresh UUID v7 (one `UPDATE` per row);
/// 3. makes it `NOT NULL` (PostgreSQL, MySQL) and `UNIQUE` (an index named
///    `<table>_<column>_key` on every backend). SQLite cannot add `NOT NULL` to an
///    existing column: there the unique index is all, which is enough for apply
///    (`ON CONFLICT (column)` needs it) — the library's hooks fill the key on every insert.
///
/// Run it in a migration of your own, after the table exists and before the first sync:
///
/// ```text
/// async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
///     sync_migrations::add_sync_key(manager, "post", "id", "sync_key").await
/// }
/// ```
pub async fn add_sync_key(
    manager: &SchemaManager<'_>,
    table: &str,
    primary_key: &str,
    column: &str,
) -> Result<(), DbErr> {
    manager
        .alter_table(
            Table::alter()
                .table(Alias::new(table))
                .add_column(ColumnDef::new(Alias::new(column)).uuid().null())
                .to_owned(),
        )
        .await?;
    let db = manager.get_connection();
    let backend = db.get_database_backend();
    // The keys as 64-bit integers, whatever the integer type of the column.
    let id = match backend {
        DbBackend::Postgres => format!("CAST({} AS BIGINT)", quoted(backend, primary_key)),
        DbBackend::MySql => format!("CAST({} AS SIGNED)", quoted(backend, primary_key)),
        _ => quoted(backend, primary_key),
    };
    let select = format!(
        "SELECT {id} FROM {} WHERE {} IS NULL",
        quoted(backend, table),
        quoted(backend, column)
    );
    let rows = db
        .query_all_raw(Statement::from_string(backend, select))
        .await?;
    for row in rows {
        let id: i64 = row.try_get_by_index(0)?;
        let statement = Query::update()
            .table(Alias::new(table))
            .value(Alias::new(column), uuid::Uuid::now_v7())
            .and_where(Expr::col(Alias::new(primary_key)).eq(id))
            .to_owned();
        db.execute(&statement).await?;
    }
    if backend != DbBackend::Sqlite {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new(table))
                    .modify_column(ColumnDef::new(Alias::new(column)).uuid().not_null())
                    .to_owned(),
            )
            .await?;
    }
    manager
        .create_index(
            Index::create()
                .name(format!("{table}_{column}_key"))
                .table(Alias::new(table))
                .col(Alias::new(column))
                .unique()
                .to_owned(),
        )
        .await
}

fn quoted(backend: DbBackend, name: &str) -> String {
    match backend {
        DbBackend::MySql => format!("`{}`", name.replace('`', "``")),
        _ => format!("\"{}\"", name.replace('"', "\"\"")),
    }
}
