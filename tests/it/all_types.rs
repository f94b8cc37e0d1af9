//! Values of every column type converge across backends: for each (leader, follower) pair of
//! SQLite, PostgreSQL and MariaDB, awkward values written on either side end as identical
//! `dump`s, and the leader's `audit` is empty (see ARCHITECTURE.md, *Canonical values*).

use std::str::FromStr;
use std::time::Duration;

use chrono::{FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use rust_decimal::Decimal;
use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, DbErr, EntityTrait, IntoActiveModel};
use sea_orm_migration::prelude::*;
use serde_json::json;
use sync_core::{Access, InProcess, Library, Registry, Seq};
use uuid::Uuid;

use crate::support::{Backend, server_url};

pub mod every_type {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// A string-valued enum, stored as text on every backend.
    #[derive(
        Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
    )]
    #[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
    pub enum Mood {
        #[sea_orm(string_value = "calm")]
        Calm,
        #[sea_orm(string_value = "über")]
        Uber,
    }

    #[derive(
        Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize, sync_core::Syncable,
    )]
    #[sea_orm(table_name = "all_types")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub text: String,
        pub maybe_text: Option<String>,
        pub small: i16,
        pub int: i32,
        pub big: i64,
        pub single: f32,
        pub double: f64,
        pub maybe_double: Option<f64>,
        pub flag: bool,
        #[sea_orm(column_type = "Decimal(Some((12, 4)))")]
        pub amount: Decimal,
        #[sea_orm(column_type = "Decimal(Some((12, 4)))")]
        pub maybe_amount: Option<Decimal>,
        pub doc: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub doc_binary: Json,
        pub maybe_doc: Option<Json>,
        pub blob: Vec<u8>,
        pub maybe_blob: Option<Vec<u8>>,
        pub day: Date,
        pub clock: Time,
        pub local_at: DateTime,
        pub utc_at: DateTimeUtc,
        pub zoned_at: DateTimeWithTimeZone,
        pub maybe_zoned_at: Option<DateTimeWithTimeZone>,
        pub other: Uuid,
        pub mood: Mood,
        pub maybe_mood: Option<Mood>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// The sync tables and `all_types`. SeaORM's default MySQL types for times keep whole
/// seconds (`datetime`, `time`) and `timestamp` ends in 2038: MySQL/MariaDB get
/// microsecond columns, as the canonical form asks of an app's schema.
struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = sync_migrations::migrations();
        all.push(Box::new(AllTypesTable));
        all
    }
}

struct AllTypesTable;

impl MigrationName for AllTypesTable {
    fn name(&self) -> &str {
        "m20261201_000001_all_types"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AllTypesTable {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let schema = sea_orm::Schema::new(backend);
        manager
            .create_table(schema.create_table_from_entity(every_type::Entity))
            .await?;
        if backend == sea_orm::DbBackend::MySql {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE all_types MODIFY clock time(6) NOT NULL, \
                     MODIFY local_at datetime(6) NOT NULL, \
                     MODIFY utc_at datetime(6) NOT NULL, \
                     MODIFY zoned_at datetime(6) NOT NULL, \
                     MODIFY maybe_zoned_at datetime(6) NULL",
                )
                .await?;
        }
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<every_type::Entity>()
        .expect("one model")
}

async fn database(server: &str, dir: &std::path::Path) -> (sea_orm::DatabaseConnection, String) {
    let url = example_app::fresh_database(server, dir)
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    (db, url)
}

fn nanos(h: u32, m: u32, s: u32, nano: u32) -> NaiveTime {
    NaiveTime::from_hms_nano_opt(h, m, s, nano).expect("time")
}

fn at(y: i32, mo: u32, d: u32, time: NaiveTime) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(y, mo, d)
        .expect("date")
        .and_time(time)
}

fn zoned(offset_secs: i32, local: NaiveDateTime) -> chrono::DateTime<FixedOffset> {
    FixedOffset::east_opt(offset_secs)
        .expect("offset")
        .from_local_datetime(&local)
        .single()
        .expect("one instant")
}

fn decimal(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal")
}

/// A row of awkward values, varied by `n`.
fn awkward(id: Uuid, n: u32) -> every_type::ActiveModel {
    let json_text = r#"{"zeta": 1, "alpha": {"nested": [1, 2.5, -0.0, "ünï💥"], "b": null},
        "big": 18446744073709551615, "neg": -9223372036854775808, "float": 1e300,
        "tiny": 1e-300, "whole": 1e19, "one": 1.0, "third": 0.30000000000000004, "t": true}"#;
    let doc: serde_json::Value = serde_json::from_str(json_text).expect("json");
    let even = n.is_multiple_of(2);
    let (small, int, big, single, double) = match n % 3 {
        0 => (i16::MIN, i32::MIN, i64::MIN, -0.0f32, -0.0f64),
        1 => (i16::MAX, i32::MAX, i64::MAX, f32::MAX, f64::MAX),
        _ => (0, -1, 1, f32::MIN_POSITIVE, -f64::MIN_POSITIVE),
    };
    every_type::ActiveModel {
        id: Set(id),
        text: Set(format!(
            "row {n}: ünïcödé 🦀 \u{200d} 'quote' \"dq\" \\ back"
        )),
        maybe_text: Set(even.then(String::new)),
        small: Set(small),
        int: Set(int),
        big: Set(big),
        single: Set(single),
        double: Set(double),
        maybe_double: Set((!even).then_some(0.1 + 0.2)),
        flag: Set(even),
        // Beyond the column's scale of 4: rounded half away from zero.
        amount: Set(decimal(
            ["12345678.12345", "-0.00005", "1.5"][n as usize % 3],
        )),
        maybe_amount: Set(even.then(|| decimal("-99999999.9999"))),
        doc: Set(doc.clone()),
        doc_binary: Set(doc),
        maybe_doc: Set((!even).then(|| json!([{"b": 2, "a": 1}, -0.0, 1e-7]))),
        blob: Set(if even {
            Vec::new()
        } else {
            vec![0, 1, 127, 128, 255]
        }),
        maybe_blob: Set((!even).then(Vec::new)),
        day: Set(NaiveDate::from_ymd_opt(1999, 12, 31).expect("date")),
        clock: Set(nanos(23, 59, 59, 999_999_999)),
        local_at: Set(at(2024, 2, 29, nanos(12, 34, 56, 123_456_789))),
        utc_at: Set(Utc.from_utc_datetime(&at(2038, 1, 19, nanos(3, 14, 7, 987_654_321)))),
        zoned_at: Set(zoned(5 * 3600 + 1800, at(2026, 6, 1, nanos(0, 30, 0, 1)))),
        maybe_zoned_at: Set(
            even.then(|| zoned(-8 * 3600, at(1969, 12, 31, nanos(23, 59, 59, 999_999_999))))
        ),
        other: Set(Uuid::new_v4()),
        mood: Set(if even {
            every_type::Mood::Uber
        } else {
            every_type::Mood::Calm
        }),
        maybe_mood: Set((!even).then_some(every_type::Mood::Uber)),
    }
}

async fn insert(library: &Library, row: every_type::ActiveModel) -> Result<(), DbErr> {
    library
        .transaction(|txn| {
            Box::pin(async move {
                row.insert(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
}

/// Makes a row's value one that some backend cannot hold.
type Spoil = fn(&mut every_type::ActiveModel);

/// Writes that no backend can hold the same way are refused when written, saying which
/// field and why.
async fn refused_when_written(library: &Library) {
    let cases: [(&str, Spoil); 9] = [
        ("utc_at", |row| {
            row.utc_at = Set(Utc.from_utc_datetime(&at(2038, 1, 19, nanos(3, 14, 8, 0))))
        }),
        ("maybe_zoned_at", |row| {
            row.maybe_zoned_at = Set(Some(zoned(3600, at(1970, 1, 1, nanos(0, 59, 59, 0)))))
        }),
        ("local_at", |row| {
            row.local_at = Set(at(999, 12, 31, nanos(0, 0, 0, 0)))
        }),
        ("day", |row| {
            row.day = Set(NaiveDate::from_ymd_opt(10_000, 1, 1).expect("date"))
        }),
        ("double", |row| row.double = Set(f64::NAN)),
        ("single", |row| row.single = Set(f32::INFINITY)),
        ("maybe_double", |row| {
            row.maybe_double = Set(Some(f64::NEG_INFINITY))
        }),
        ("amount", |row| row.amount = Set(decimal("123456789.5"))),
        ("maybe_amount", |row| {
            row.maybe_amount = Set(Some(decimal("-100000000")))
        }),
    ];
    for (field, spoil) in cases {
        let mut row = awkward(Uuid::now_v7(), 0);
        spoil(&mut row);
        let err = insert(library, row).await.expect_err(field);
        let message = err.to_string();
        assert!(
            message.contains(&format!("field `{field}`")),
            "the refusal names the field `{field}`: {message}"
        );
    }
}

async fn pair(leader_backend: Backend, follower_backend: Backend, test: &str) {
    let (Some(leader_server), Some(follower_server)) = (
        server_url(leader_backend, test),
        server_url(follower_backend, test),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let (db, leader_url) = database(&leader_server, dir.path()).await;
    let leader = Library::create(db, "all", registry())
        .await
        .expect("create");
    let (db, follower_url) = database(&follower_server, dir.path()).await;
    let key = Library::device_key_of(&db).await.expect("key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(Access::Write, Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .leader()
        .expect("the leader")
        .redeem_invite(&invite.secret, Access::Write, key.fingerprint(), None)
        .await
        .expect("redeem");
    let follower = Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "all",
        Access::Write,
        registry(),
    )
    .await
    .expect("join");
    let transport = InProcess::new(leader.leader().expect("the leader"));
    let sync = async || {
        follower
            .follower()
            .expect("a follower")
            .push_outbox(&transport)
            .await
            .expect("push");
        follower
            .follower()
            .expect("a follower")
            .catch_up(&transport, 1_000)
            .await
            .expect("pull");
    };

    refused_when_written(&leader).await;
    refused_when_written(&follower).await;

    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate().take(3) {
        insert(&leader, awkward(*id, n as u32))
            .await
            .expect("leader write");
    }
    for (n, id) in ids.iter().enumerate().skip(3) {
        insert(&follower, awkward(*id, n as u32))
            .await
            .expect("follower write");
    }
    sync().await;

    // The writer's own row holds the canonical value (the hooks changed it before it was
    // written), so it is what every device stores.
    let row = every_type::Entity::find_by_id(ids[0])
        .one(leader.db())
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.local_at.nanosecond(), 123_456_000, "microseconds");
    assert_eq!(row.clock.nanosecond(), 999_999_000, "microseconds");
    assert_eq!(row.utc_at.nanosecond(), 987_654_000, "microseconds");
    assert_eq!(row.zoned_at.offset().local_minus_utc(), 0, "UTC");
    assert_eq!(
        row.zoned_at,
        zoned(5 * 3600 + 1800, at(2026, 6, 1, nanos(0, 30, 0, 0)))
    );
    assert_eq!(row.amount, decimal("12345678.1235"), "rounded to scale 4");
    assert_eq!(row.amount.to_string(), "12345678.1235");
    assert!(row.single.is_sign_positive() && row.single == 0.0, "-0 → 0");
    assert!(row.double.is_sign_positive() && row.double == 0.0, "-0 → 0");

    // Edits of each other's rows, both ways.
    let mut edit = every_type::Entity::find_by_id(ids[1])
        .one(follower.db())
        .await
        .expect("read")
        .expect("pulled row")
        .into_active_model();
    edit.amount = Set(decimal("0.00015"));
    edit.local_at = Set(at(2000, 1, 1, nanos(0, 0, 0, 999)));
    edit.doc = Set(json!({"z": {"y": [1e19, -0.0]}, "a": "x"}));
    edit.maybe_zoned_at = Set(Some(zoned(
        -(3 * 3600 + 1800),
        at(2026, 12, 1, nanos(9, 0, 0, 1_500)),
    )));
    let follower_edit = edit;
    follower
        .transaction(|txn| {
            Box::pin(async move {
                follower_edit.update(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("follower edit");
    let mut edit = every_type::Entity::find_by_id(ids[4])
        .one(leader.db())
        .await
        .expect("read")
        .expect("pushed row")
        .into_active_model();
    edit.single = Set(-1.5e-38);
    edit.double = Set(-123.456e-300);
    edit.maybe_double = Set(Some(5e-324));
    edit.utc_at = Set(Utc.from_utc_datetime(&at(1970, 1, 1, nanos(0, 0, 1, 1))));
    leader
        .transaction(|txn| {
            Box::pin(async move {
                edit.update(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("leader edit");
    sync().await;

    let leader_dump = leader.dump().await.expect("dump");
    let follower_dump = follower.dump().await.expect("dump");
    assert_eq!(
        leader_dump["all_types"].as_array().map(Vec::len),
        Some(6),
        "every row on the leader"
    );
    assert_eq!(
        serde_json::to_string_pretty(&leader_dump).expect("text"),
        serde_json::to_string_pretty(&follower_dump).expect("text"),
        "{leader_backend:?} leader and {follower_backend:?} follower converge"
    );
    let drift = leader.audit().await.expect("audit");
    let mut why = String::new();
    if !drift.is_empty() {
        let log = leader.read_log(Seq::ZERO, 1_000).await.expect("log");
        for d in &drift {
            let logged = log.iter().rev().find(|e| e.record_id == d.record_id);
            let row = leader_dump["all_types"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["id"] == d.record_id.as_str()));
            why += &format!(
                "\n{}: logged {:?}\n  row {:?}",
                d.record_id,
                logged.and_then(|e| e.data.as_deref()),
                row.map(ToString::to_string)
            );
        }
    }
    assert!(drift.is_empty(), "the leader's audit finds drift:{why}");

    let _ = leader.db().clone().close().await;
    let _ = follower.db().clone().close().await;
    let _ = example_app::drop_database(&leader_url).await;
    let _ = example_app::drop_database(&follower_url).await;
}

macro_rules! pairs {
    ($($name:ident: $leader:ident, $follower:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                pair(
                    Backend::$leader,
                    Backend::$follower,
                    concat!(module_path!(), "::", stringify!($name)),
                )
                .await;
            }
        )*
    };
}

pairs! {
    sqlite_leader_sqlite_follower: Sqlite, Sqlite;
    sqlite_leader_postgres_follower: Sqlite, Postgres;
    sqlite_leader_mysql_follower: Sqlite, Mysql;
    postgres_leader_sqlite_follower: Postgres, Sqlite;
    postgres_leader_postgres_follower: Postgres, Postgres;
    postgres_leader_mysql_follower: Postgres, Mysql;
    mysql_leader_sqlite_follower: Mysql, Sqlite;
    mysql_leader_postgres_follower: Mysql, Postgres;
    mysql_leader_mysql_follower: Mysql, Mysql;
}
