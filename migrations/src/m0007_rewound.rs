//! The old leader's return (issue 13): the entries a device held after a fork point that a
//! newer epoch did not keep, set aside where the user sees them, each with what became of
//! it (an outbox change for the new leader, under the change id it was pushed with, or set
//! aside: taken marks, membership, a move record of the abandoned branch).

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0007_rewound"
    }
}

/// Device, library and change ids: UUIDs as text.
const ID_LEN: u32 = 36;

#[derive(DeriveIden)]
enum SyncRewound {
    Table,
    LibraryId,
    Epoch,
    Seq,
    ForkSeq,
    Model,
    RecordId,
    Op,
    Data,
    DeviceId,
    Hlc,
    Disposition,
    ChangeId,
    RewoundAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SyncRewound::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncRewound::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    // The epoch the device rewound onto (the surviving history's).
                    .col(ColumnDef::new(SyncRewound::Epoch).big_integer().not_null())
                    // The abandoned entry's seq on the branch it was sequenced on.
                    .col(ColumnDef::new(SyncRewound::Seq).big_integer().not_null())
                    // The seq the surviving history shares with the abandoned branch.
                    .col(
                        ColumnDef::new(SyncRewound::ForkSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncRewound::Model)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncRewound::RecordId)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncRewound::Op).string_len(16).not_null())
                    .col(ColumnDef::new(SyncRewound::Data).text().null())
                    // The entry's author.
                    .col(
                        ColumnDef::new(SyncRewound::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncRewound::Hlc).big_integer().not_null())
                    // `outbox`, `taken_marks`, `membership`, `move_record`,
                    // `unknown_reserved`, `not_pushed`.
                    .col(
                        ColumnDef::new(SyncRewound::Disposition)
                            .string_len(32)
                            .not_null(),
                    )
                    // For an outbox change: the change id it is pushed under.
                    .col(
                        ColumnDef::new(SyncRewound::ChangeId)
                            .string_len(ID_LEN)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(SyncRewound::RewoundAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(SyncRewound::LibraryId)
                            .col(SyncRewound::Epoch)
                            .col(SyncRewound::Seq),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SyncRewound::Table).to_owned())
            .await
    }
}
