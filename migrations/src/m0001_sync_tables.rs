//! Libraries, the log, devices, this device's own facts, and follower positions.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0001_sync_tables"
    }
}

#[derive(DeriveIden)]
enum SyncLibrary {
    Table,
    Id,
    Name,
    LeaderDeviceId,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum SyncLog {
    Table,
    LibraryId,
    Seq,
    Model,
    RecordId,
    Op,
    Data,
    Changed,
    DeviceId,
    Hlc,
    SchemaVersion,
    Checksum,
}

#[derive(DeriveIden)]
enum SyncPending {
    Table,
    Id,
    LibraryId,
    Model,
    RecordId,
    Op,
    Data,
    Changed,
    DeviceId,
    Hlc,
    SchemaVersion,
}

#[derive(DeriveIden)]
enum SyncDevice {
    Table,
    LibraryId,
    DeviceId,
    Role,
    Name,
    AddedAtMs,
    RevokedAtMs,
}

#[derive(DeriveIden)]
enum SyncLocal {
    Table,
    Key,
    Value,
}

#[derive(DeriveIden)]
enum SyncPosition {
    Table,
    LibraryId,
    Seq,
    Checksum,
    UpdatedAtMs,
}

/// Ids are UUIDs as text: one representation on every backend.
const ID_LEN: u32 = 36;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SyncLibrary::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncLibrary::Id)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SyncLibrary::Name).string().not_null())
                    .col(
                        ColumnDef::new(SyncLibrary::LeaderDeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncLibrary::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // The primary key (library_id, seq) is the index that reads a range of the log.
        manager
            .create_table(
                Table::create()
                    .table(SyncLog::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncLog::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncLog::Seq).big_integer().not_null())
                    .col(ColumnDef::new(SyncLog::Model).string_len(128).not_null())
                    .col(ColumnDef::new(SyncLog::RecordId).string_len(255).not_null())
                    .col(ColumnDef::new(SyncLog::Op).string_len(16).not_null())
                    .col(ColumnDef::new(SyncLog::Data).text().null())
                    .col(ColumnDef::new(SyncLog::Changed).text().not_null())
                    .col(
                        ColumnDef::new(SyncLog::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncLog::Hlc).big_integer().not_null())
                    .col(ColumnDef::new(SyncLog::SchemaVersion).integer().not_null())
                    .col(ColumnDef::new(SyncLog::Checksum).big_integer().not_null())
                    .primary_key(Index::create().col(SyncLog::LibraryId).col(SyncLog::Seq))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SyncDevice::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncDevice::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncDevice::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncDevice::Role).string_len(16).not_null())
                    .col(ColumnDef::new(SyncDevice::Name).string().null())
                    .col(
                        ColumnDef::new(SyncDevice::AddedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncDevice::RevokedAtMs).big_integer().null())
                    .primary_key(
                        Index::create()
                            .col(SyncDevice::LibraryId)
                            .col(SyncDevice::DeviceId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SyncLocal::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncLocal::Key)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SyncLocal::Value).text().not_null())
                    .to_owned(),
            )
            .await?;
        // A follower's position in a library's log moves in the same transaction as the
        // data it applies.
        manager
            .create_table(
                Table::create()
                    .table(SyncPosition::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncPosition::LibraryId)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SyncPosition::Seq).big_integer().not_null())
                    .col(
                        ColumnDef::new(SyncPosition::Checksum)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncPosition::UpdatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // Entries committed by PostgreSQL writers and not yet numbered: the sequencer moves
        // them into sync_log in commit order. The auto-increment id keeps a transaction's
        // own writes in order.
        manager
            .create_table(
                Table::create()
                    .table(SyncPending::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncPending::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncPending::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncPending::Model)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncPending::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncPending::Op).string_len(16).not_null())
                    .col(ColumnDef::new(SyncPending::Data).text().null())
                    .col(ColumnDef::new(SyncPending::Changed).text().not_null())
                    .col(
                        ColumnDef::new(SyncPending::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncPending::Hlc).big_integer().not_null())
                    .col(
                        ColumnDef::new(SyncPending::SchemaVersion)
                            .integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            SyncPending::Table.into_iden(),
            SyncPosition::Table.into_iden(),
            SyncLocal::Table.into_iden(),
            SyncDevice::Table.into_iden(),
            SyncLog::Table.into_iden(),
            SyncLibrary::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
