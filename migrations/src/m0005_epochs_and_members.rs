//! Leadership that can move: each library's epoch (its leadership term, one more with
//! every move) and where the epoch began, and every member's key fingerprint and
//! advertised addresses, so that the membership replicates to every member (a follower
//! can then trust a new leader's key, and reach it).

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0005_epochs_and_members"
    }
}

#[derive(DeriveIden)]
enum SyncLibrary {
    Table,
    Epoch,
    EpochStartSeq,
}

#[derive(DeriveIden)]
enum SyncDevice {
    Table,
    Key,
    Addresses,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Existing libraries are in their first epoch, which begins before seq 1. SQLite
        // adds one column per ALTER TABLE.
        for column in [
            ColumnDef::new(SyncLibrary::Epoch)
                .big_integer()
                .not_null()
                .default(1)
                .to_owned(),
            // The seq of the move record that began the epoch (0: the first epoch).
            ColumnDef::new(SyncLibrary::EpochStartSeq)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(SyncLibrary::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        for column in [
            // The member's key fingerprint (64 hex digits, `KeyFingerprint`); the device id
            // derives from it. NULL for members admitted before this migration whose key
            // the leader never learnt.
            ColumnDef::new(SyncDevice::Key)
                .string_len(64)
                .null()
                .to_owned(),
            // Where the member says it can be reached (a JSON array of `host:port`), for
            // when it leads. NULL: nowhere announced.
            ColumnDef::new(SyncDevice::Addresses)
                .text()
                .null()
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(SyncDevice::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::Sqlite {
            // sea-query does not drop SQLite columns; the columns are harmless.
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(SyncDevice::Table)
                    .drop_column(SyncDevice::Key)
                    .drop_column(SyncDevice::Addresses)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SyncLibrary::Table)
                    .drop_column(SyncLibrary::Epoch)
                    .drop_column(SyncLibrary::EpochStartSeq)
                    .to_owned(),
            )
            .await
    }
}
