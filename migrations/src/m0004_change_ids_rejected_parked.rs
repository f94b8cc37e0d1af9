//! Changes that survive restores, changes that cannot be stored, and entries set aside:
//! the outbox's change identities, the leader's record of every change it has taken, the
//! rejected changes and the parked entries.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0004_change_ids_rejected_parked"
    }
}

#[derive(DeriveIden)]
enum SyncOutbox {
    Table,
    ChangeId,
}

#[derive(DeriveIden)]
enum SyncTaken {
    Table,
    ChangeId,
    LibraryId,
    DeviceId,
    TakenAtMs,
}

#[derive(DeriveIden)]
enum SyncRejected {
    Table,
    ChangeId,
    LibraryId,
    DeviceId,
    Model,
    RecordId,
    Op,
    Data,
    Reason,
    RejectedAtMs,
}

#[derive(DeriveIden)]
enum SyncParked {
    Table,
    LibraryId,
    Seq,
    Model,
    RecordId,
    Entry,
    Reason,
    ParkedAtMs,
}

/// Ids are UUIDs as text: one representation on every backend.
const ID_LEN: u32 = 36;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Each outbox change's identity (UUID v7), made when it is written. Rows written by
        // an earlier build have none; they are pushed under an identity derived from the
        // device and the outbox id.
        manager
            .alter_table(
                Table::alter()
                    .table(SyncOutbox::Table)
                    .add_column(
                        ColumnDef::new(SyncOutbox::ChangeId)
                            .string_len(ID_LEN)
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        // On the leader: every pushed change it has taken (sequenced, merged away or
        // rejected), by identity. A change pushed again (a lost acknowledgement, a restored
        // or copied database) is found here and taken once.
        manager
            .create_table(
                Table::create()
                    .table(SyncTaken::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncTaken::ChangeId)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncTaken::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncTaken::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncTaken::TakenAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // Changes the leader could not store: on the leader every device's, on a follower
        // its own (from the leader's answer to its push).
        manager
            .create_table(
                Table::create()
                    .table(SyncRejected::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncRejected::ChangeId)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncRejected::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncRejected::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncRejected::Model)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncRejected::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncRejected::Op).string_len(16).not_null())
                    .col(ColumnDef::new(SyncRejected::Data).text().null())
                    .col(ColumnDef::new(SyncRejected::Reason).text().not_null())
                    .col(
                        ColumnDef::new(SyncRejected::RejectedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // On a follower: pulled entries an operator set aside (and the later entries of
        // the same records, which wait behind them). `entry` is empty until the parked
        // seq arrives in a pull.
        manager
            .create_table(
                Table::create()
                    .table(SyncParked::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncParked::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncParked::Seq).big_integer().not_null())
                    .col(ColumnDef::new(SyncParked::Model).string_len(128).null())
                    .col(ColumnDef::new(SyncParked::RecordId).string_len(255).null())
                    .col(ColumnDef::new(SyncParked::Entry).text().null())
                    .col(ColumnDef::new(SyncParked::Reason).text().not_null())
                    .col(
                        ColumnDef::new(SyncParked::ParkedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(SyncParked::LibraryId)
                            .col(SyncParked::Seq),
                    )
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::MySql {
            // MySQL's TEXT holds 64 KiB; a record's synced data may be up to
            // `sync_core::RECORD_BYTES_MAX` (4 MiB), and a parked entry holds one whole.
            let db = manager.get_connection();
            for statement in [
                "ALTER TABLE sync_log MODIFY data LONGTEXT NULL",
                "ALTER TABLE sync_pending MODIFY data LONGTEXT NULL",
                "ALTER TABLE sync_outbox MODIFY data LONGTEXT NULL",
                "ALTER TABLE sync_conflict MODIFY local LONGTEXT NOT NULL",
                "ALTER TABLE sync_conflict MODIFY remote LONGTEXT NOT NULL",
                "ALTER TABLE sync_rejected MODIFY data LONGTEXT NULL",
                "ALTER TABLE sync_parked MODIFY entry LONGTEXT NULL",
            ] {
                db.execute_unprepared(statement).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            SyncParked::Table.into_iden(),
            SyncRejected::Table.into_iden(),
            SyncTaken::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::Sqlite {
            // sea-query does not drop SQLite columns; the empty column is harmless.
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(SyncOutbox::Table)
                    .drop_column(SyncOutbox::ChangeId)
                    .to_owned(),
            )
            .await
    }
}
