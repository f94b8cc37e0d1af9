//! SeaORM entities for the sync tables that `sync-migrations` creates. Internal: apps reach
//! them through `Library`.
#![allow(missing_docs, unreachable_pub)]

pub mod library {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_library")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub leader_device_id: String,
        pub created_at_ms: i64,
        /// The leadership's epoch: 1 at creation, one more with every move.
        pub epoch: i64,
        /// The seq of the move record that began `epoch` (0 in the first epoch).
        pub epoch_start_seq: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod log {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_log")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub changed: String,
        pub device_id: String,
        pub hlc: i64,
        pub schema_version: i32,
        pub checksum: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod pending {
    use sea_orm::entity::prelude::*;

    /// Entries committed on PostgreSQL, waiting for the sequencer.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_pending")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub library_id: String,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub changed: String,
        pub device_id: String,
        pub hlc: i64,
        pub schema_version: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod device {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_device")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: String,
        /// The member's access (`leader`, `write`, `read`); the column keeps its first name.
        #[sea_orm(column_name = "role")]
        pub access: String,
        pub name: Option<String>,
        pub added_at_ms: i64,
        pub revoked_at_ms: Option<i64>,
        /// The member's key fingerprint (64 hex digits), when known.
        pub key: Option<String>,
        /// Where it can be reached when it leads: a JSON array of `host:port`.
        #[sea_orm(column_type = "Text", nullable)]
        pub addresses: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod local {
    use sea_orm::entity::prelude::*;

    /// Facts about this device: its id, and later its key pair.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_local")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        #[sea_orm(column_type = "Text")]
        pub value: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod position {
    use sea_orm::entity::prelude::*;

    /// A follower's position in a library's log, moved with the data it applies.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_position")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        pub seq: i64,
        pub checksum: i64,
        pub updated_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod invite {
    use sea_orm::entity::prelude::*;

    /// An invite the leader issued: only the hash of its secret is kept.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_invite")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub secret_hash: String,
        pub library_id: String,
        /// The access the invite grants; the column keeps its first name.
        #[sea_orm(column_name = "role")]
        pub access: String,
        pub created_at_ms: i64,
        pub expires_at_ms: i64,
        pub used_at_ms: Option<i64>,
        pub used_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod peer {
    use sea_orm::entity::prelude::*;

    /// Where a follower last pulled from, as the leader saw it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_peer")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: String,
        pub position: i64,
        pub last_seen_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod outbox {
    use sea_orm::entity::prelude::*;

    /// A follower's own write, waiting for the leader to sequence it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_outbox")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub library_id: String,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub changed: String,
        pub hlc: i64,
        pub schema_version: i32,
        pub base_seq: i64,
        /// The change's identity (UUID v7); `None` in rows written by an earlier build.
        pub change_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod pushed {
    use sea_orm::entity::prelude::*;

    /// On the leader, from builds before change identities: the last outbox id of a device
    /// that it took. Read only for outbox rows written by such a build.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_pushed")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub device_id: String,
        /// The last outbox id acknowledged; the column keeps its first name.
        #[sea_orm(column_name = "through")]
        pub acknowledged: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod conflict {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// An open conflict: a synced model of sync-core's own, so every device sees it and any
    /// device with write access can resolve it (a resolution deletes the row and writes the record,
    /// both ordinary changes).
    #[derive(
        Clone,
        Debug,
        PartialEq,
        Eq,
        DeriveEntityModel,
        Serialize,
        Deserialize,
        sync_derive::Syncable,
    )]
    #[sea_orm(table_name = "sync_conflict")]
    #[sync(crate = "crate")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The conflicting record's model and key.
        pub model: String,
        pub record_id: String,
        /// The value the library kept (JSON object of the conflicting synced fields).
        #[sea_orm(column_type = "Text")]
        pub local: String,
        /// The concurrent value set aside.
        #[sea_orm(column_type = "Text")]
        pub remote: String,
        /// The device that wrote the value set aside.
        pub remote_device: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

pub mod taken {
    use sea_orm::entity::prelude::*;

    /// On the leader: a pushed change it has taken, by identity.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_taken")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub change_id: String,
        pub library_id: String,
        pub device_id: String,
        pub taken_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod rewound {
    use sea_orm::entity::prelude::*;

    /// An entry a device held after a fork point that the surviving history did not
    /// keep, and what became of it (see `rewind.rs`).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_rewound")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub epoch: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub fork_seq: i64,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        pub device_id: String,
        pub hlc: i64,
        pub disposition: String,
        pub change_id: Option<String>,
        pub rewound_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod rejected {
    use sea_orm::entity::prelude::*;

    /// A pushed change the leader could not store, set aside with its reason.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_rejected")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub change_id: String,
        pub library_id: String,
        pub device_id: String,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        pub rejected_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod parked {
    use sea_orm::entity::prelude::*;

    /// On a follower: a pulled entry set aside by an operator, or waiting behind one of the
    /// same record. `entry` (the `LogEntry` as JSON) is `None` until the seq arrives.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_parked")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub model: Option<String>,
        pub record_id: Option<String>,
        #[sea_orm(column_type = "Text", nullable)]
        pub entry: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        pub parked_at_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod skipped {
    use sea_orm::entity::prelude::*;

    /// On a follower: a run of seqs it holds no entries of (see `held.rs`), with the log's
    /// checksum at `through_seq`. `not_held`: applied before it kept its log.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_log_skipped")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub library_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub from_seq: i64,
        pub through_seq: i64,
        pub checksum: i64,
        pub not_held: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod acknowledged {
    use sea_orm::entity::prelude::*;

    /// On a follower: a change of its own the leader acknowledged, until its position
    /// reaches `through_seq` (the leader's latest seq in the acknowledgement).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_acknowledged")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub change_id: String,
        pub library_id: String,
        pub model: String,
        pub record_id: String,
        pub op: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub data: Option<String>,
        pub through_seq: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
