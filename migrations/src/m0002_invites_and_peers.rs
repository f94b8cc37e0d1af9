//! Invites a leader issued, and what the leader knows of each follower's progress.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "sync_core_m0002_invites_and_peers"
    }
}

#[derive(DeriveIden)]
enum SyncInvite {
    Table,
    SecretHash,
    LibraryId,
    Role,
    CreatedAtMs,
    ExpiresAtMs,
    UsedAtMs,
    UsedBy,
}

#[derive(DeriveIden)]
enum SyncPeer {
    Table,
    LibraryId,
    DeviceId,
    Position,
    LastSeenMs,
}

/// Ids are UUIDs as text: one representation on every backend.
const ID_LEN: u32 = 36;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The leader keeps only a hash of each invite's secret: its database does not hold
        // a usable token.
        manager
            .create_table(
                Table::create()
                    .table(SyncInvite::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncInvite::SecretHash)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SyncInvite::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncInvite::Role).string_len(16).not_null())
                    .col(
                        ColumnDef::new(SyncInvite::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncInvite::ExpiresAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncInvite::UsedAtMs).big_integer().null())
                    .col(ColumnDef::new(SyncInvite::UsedBy).string_len(ID_LEN).null())
                    .to_owned(),
            )
            .await?;
        // The position each follower last pulled from, for the leader's status.
        manager
            .create_table(
                Table::create()
                    .table(SyncPeer::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SyncPeer::LibraryId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SyncPeer::DeviceId)
                            .string_len(ID_LEN)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SyncPeer::Position).big_integer().not_null())
                    .col(
                        ColumnDef::new(SyncPeer::LastSeenMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(SyncPeer::LibraryId)
                            .col(SyncPeer::DeviceId),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SyncPeer::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(SyncInvite::Table).to_owned())
            .await
    }
}
