//! Offline writes on followers: the outbox, the leader's record of what each device has
//! pushed, recorded conflicts, and the index the leader's conflict check reads.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0003_outbox_and_conflicts"
    }
}

#[derive(DeriveIden)]
enum SyncOutbox {
    Table,
    Id,
    LibraryId,
    Model,
    RecordId,
    Op,
    Data,
    Changed,
    Hlc,
    SchemaVersion,
    BaseSeq,
}

#[derive(DeriveIden)]
enum SyncPushed {
    Table,
    LibraryId,
    DeviceId,
    Through,
}

#[derive(DeriveIden)]
enum SyncConflict {
    Table,
    Id,
    Model,
    RecordId,
    Local,
    Remote,
    RemoteDevice,
}

#[derive(DeriveIden)]
enum SyncLog {
    Table,
    LibraryId,
    Model,
    RecordId,
    Seq,
}

/// Ids are UUIDs as text: one representation on every backend.
const ID_LEN: u32 = 36;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A follower's own writes, waiting for the leader to sequence them. The id only ever
        // grows (AUTOINCREMENT on SQLite, a sequence on PostgreSQL, InnoDB's persistent
        // counter on MariaDB), so "everything up to id N" names a prefix that never gains a
        // member: the leader's acknowledgement is that N.
        manager
            .create_table(
                Table::create()
                    .table(SyncOutbox::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncOutbox::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncOutbox::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncOutbox::Model).string_len(128).not_null())
                    .col(
                        ColumnDef::new(SyncOutbox::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncOutbox::Op).string_len(16).not_null())
                    .col(ColumnDef::new(SyncOutbox::Data).text().null())
                    .col(ColumnDef::new(SyncOutbox::Changed).text().not_null())
                    .col(ColumnDef::new(SyncOutbox::Hlc).big_integer().not_null())
                    .col(
                        ColumnDef::new(SyncOutbox::SchemaVersion)
                            .integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncOutbox::BaseSeq).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        // A write looks up its record's unpushed changes (to inherit their base).
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("sync_outbox_record")
                    .table(SyncOutbox::Table)
                    .col(SyncOutbox::LibraryId)
                    .col(SyncOutbox::Model)
                    .col(SyncOutbox::RecordId)
                    .to_owned(),
            )
            .await?;
        // On the leader: the last outbox id of each device it has sequenced. A push repeated
        // after a lost acknowledgement finds its entries at or below it and logs nothing.
        manager
            .create_table(
                Table::create()
                    .table(SyncPushed::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncPushed::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncPushed::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncPushed::Through).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(SyncPushed::LibraryId)
                            .col(SyncPushed::DeviceId),
                    )
                    .to_owned(),
            )
            .await?;
        // Open conflicts: a synced model of sync-core's own, so they replicate like data.
        manager
            .create_table(
                Table::create()
                    .table(SyncConflict::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncConflict::Id)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncConflict::Model)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncConflict::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncConflict::Local).text().not_null())
                    .col(ColumnDef::new(SyncConflict::Remote).text().not_null())
                    .col(
                        ColumnDef::new(SyncConflict::RemoteDevice)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // The leader's conflict check: the entries of one record after a seq.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("sync_log_record")
                    .table(SyncLog::Table)
                    .col(SyncLog::LibraryId)
                    .col(SyncLog::Model)
                    .col(SyncLog::RecordId)
                    .col(SyncLog::Seq)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("sync_log_record")
                    .table(SyncLog::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("sync_outbox_record")
                    .table(SyncOutbox::Table)
                    .to_owned(),
            )
            .await?;
        for table in [
            SyncConflict::Table.into_iden(),
            SyncPushed::Table.into_iden(),
            SyncOutbox::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
