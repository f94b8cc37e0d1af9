//! Followers keep the log they applied: the entries go into their own `sync_log` (the
//! same rows as the leader's), and the runs a pull left out — superseded or unrequested
//! entries, whose checksums still chain — into `sync_log_skipped`, so that entries and
//! skipped runs cover a follower's log from seq 1 to its position and the chain is
//! checkable. A follower that applied entries before this migration holds none of them:
//! the library marks that run `not_held` when it opens. And what a follower's push had
//! acknowledged but its pulls have not yet brought back (`sync_acknowledged`), which its
//! audit must not take for drift.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0006_follower_log"
    }
}

const ID_LEN: u32 = 36;

#[derive(DeriveIden)]
enum SyncLogSkipped {
    Table,
    LibraryId,
    FromSeq,
    ThroughSeq,
    Checksum,
    NotHeld,
}

#[derive(DeriveIden)]
enum SyncAcknowledged {
    Table,
    ChangeId,
    LibraryId,
    Model,
    RecordId,
    Op,
    Data,
    ThroughSeq,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A run of seqs `from_seq..=through_seq` that a follower holds no entries of, with
        // the log's checksum at `through_seq`. `not_held`: applied before the follower
        // kept its log (its entries were never stored here), rather than left out by the
        // leader's pull.
        manager
            .create_table(
                Table::create()
                    .table(SyncLogSkipped::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncLogSkipped::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncLogSkipped::FromSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncLogSkipped::ThroughSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncLogSkipped::Checksum)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncLogSkipped::NotHeld)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .primary_key(
                        Index::create()
                            .col(SyncLogSkipped::LibraryId)
                            .col(SyncLogSkipped::FromSeq),
                    )
                    .to_owned(),
            )
            .await?;
        // A follower's change the leader acknowledged, until the follower's position
        // reaches `through_seq` (the leader's latest seq in the acknowledgement), where
        // the change's entry, if it made one, is then applied.
        manager
            .create_table(
                Table::create()
                    .table(SyncAcknowledged::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncAcknowledged::ChangeId)
                            .string_len(ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncAcknowledged::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncAcknowledged::Model)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncAcknowledged::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncAcknowledged::Op)
                            .string_len(16)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncAcknowledged::Data).text().null())
                    .col(
                        ColumnDef::new(SyncAcknowledged::ThroughSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("sync_acknowledged_through")
                    .table(SyncAcknowledged::Table)
                    .col(SyncAcknowledged::LibraryId)
                    .col(SyncAcknowledged::ThroughSeq)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::MySql {
            // A record's synced data may be up to `sync_core::RECORD_BYTES_MAX` (4 MiB).
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE sync_acknowledged MODIFY data LONGTEXT NULL")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            SyncAcknowledged::Table.into_iden(),
            SyncLogSkipped::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
