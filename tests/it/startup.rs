//! Start-up as apps already do it: `Database::connect(url)` with SeaORM's default pool (on
//! SQLite, one connection), `Library::open_or_create` on every start, and the README's
//! quickstart, which is `example-app/examples/quickstart.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use example_app::{Migrator, ops, registry};
use sea_orm::{Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;
use sync_core::{Access, FollowConfig, Library, OpenError, Seq};
use sync_transport::{Client, ClientConfig, JoinToken, QuicTransport, Server, ServerConfig};

use crate::support::Fixture;

#[allow(dead_code)]
#[path = "../../example-app/examples/quickstart.rs"]
mod quickstart;

/// Everything a test does, start to end: a deadlock fails it instead of hanging it.
const WHOLE_TEST: Duration = Duration::from_secs(120);
const DEADLINE: Duration = Duration::from_secs(30);

/// Connects the way most apps do, with SeaORM's default options, and migrates.
async fn default_pool(dir: &Path, file: &str) -> DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.join(file).display());
    let db = Database::connect(url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    db
}

async fn put_tag(library: &Library, name: &str) -> Seq {
    tokio::time::timeout(
        DEADLINE,
        ops::put(library, "tag", &format!(r#"{{"name":"{name}"}}"#)),
    )
    .await
    .expect("the write did not finish: is a pooled connection held?")
    .expect("put");
    library.latest_seq().await.expect("latest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_on_sqlite_s_default_pool_writes_serves_and_follows() {
    tokio::time::timeout(WHOLE_TEST, default_pool_case())
        .await
        .expect("deadlocked: the test did not finish in time");
}

async fn default_pool_case() {
    let dir = tempfile::tempdir().expect("dir");
    let db = default_pool(dir.path(), "leader.db").await;
    // The premise: the pool this test runs on has a single connection.
    assert_eq!(
        db.get_sqlite_connection_pool()
            .options()
            .get_max_connections(),
        1
    );
    let leader = Library::open_or_create(db, "default pool", registry())
        .await
        .expect("open or create");
    put_tag(&leader, "before serving").await;

    // Serving starts the commit watcher, which must not keep the app's only connection.
    let key = leader.device_key().await.expect("key");
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &key,
        vec![leader.clone()],
        ServerConfig::default(),
    )
    .await
    .expect("bind");
    let address = server.local_addr().to_string();
    for i in 0..3 {
        put_tag(&leader, &format!("serving {i}")).await;
    }

    // A follower, on a default pool too, joins, follows, and writes.
    let db = default_pool(dir.path(), "follower.db").await;
    let client = Client::new(
        Library::device_key_of(&db).await.expect("key"),
        ClientConfig::default(),
    );
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(Access::Write, Duration::from_secs(600))
        .await
        .expect("invite");
    let token = JoinToken::new(&invite, &address, key.fingerprint());
    let joined = client.join(&token, Some("laptop")).await.expect("join");
    let follower = Library::join(
        db,
        joined.library_id,
        joined.leader_device_id,
        &joined.library_name,
        joined.access,
        registry(),
    )
    .await
    .expect("join stored");
    let transport = Arc::new(QuicTransport::new(
        client,
        &address,
        key.fingerprint(),
        follower.id(),
    ));
    let follow = follower.follower().expect("a follower").start_following(
        transport,
        FollowConfig {
            retry_delay_min: Duration::from_millis(20),
            retry_delay_max: Duration::from_millis(200),
            ..FollowConfig::default()
        },
    );
    let latest = leader.latest_seq().await.expect("latest");
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("the follower caught up");

    // Writes on both sides while the leader serves and the follower follows.
    for i in 0..3 {
        let latest = put_tag(&leader, &format!("live {i}")).await;
        follow
            .wait_for(DEADLINE, |s| s.position >= latest)
            .await
            .expect("a live write applied");
    }
    let before = leader.latest_seq().await.expect("latest");
    tokio::time::timeout(
        DEADLINE,
        ops::put(&follower, "tag", r#"{"name":"from the follower"}"#),
    )
    .await
    .expect("the follower's write did not finish")
    .expect("put on the follower");
    follow
        .wait_for(DEADLINE, |s| s.outbox == 0 && s.position > before)
        .await
        .expect("the follower's write pushed, sequenced and pulled back");
    assert!(leader.latest_seq().await.expect("latest") > before);
    assert_eq!(
        leader.dump().await.expect("dump"),
        follower.dump().await.expect("dump")
    );

    follow.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_or_create_opens_the_same_library_on_every_start_and_create_refuses_a_second() {
    let dir = tempfile::tempdir().expect("dir");
    let first = Library::open_or_create(default_pool(dir.path(), "app.db").await, "A", registry())
        .await
        .expect("first start");
    put_tag(&first, "kept").await;
    // A restart: a new connection, the same call.
    let db = default_pool(dir.path(), "app.db").await;
    let again = Library::open_or_create(db.clone(), "A", registry())
        .await
        .expect("second start");
    assert_eq!(again.id(), first.id());
    assert_eq!(again.latest_seq().await.expect("latest"), Seq(1));
    match Library::create(db.clone(), "B", registry()).await {
        Err(OpenError::AlreadyHasLibrary(id)) => assert_eq!(id, first.id()),
        other => panic!(
            "a second create was not refused: {:?}",
            other.map(|l| l.id())
        ),
    }
    // The refused create changed nothing: the default library is the first one.
    let default = Library::open_default(db, registry())
        .await
        .expect("open default");
    assert_eq!(default.id(), first.id());
}

/// `create` on a database that already holds a library (the fixture's) is refused on
/// every backend, and `open_or_create` opens the one it holds.
async fn create_is_refused_where_a_library_exists(fixture: Fixture) -> Fixture {
    let db = fixture.library.db().clone();
    match Library::create(db.clone(), "second", registry()).await {
        Err(OpenError::AlreadyHasLibrary(id)) => assert_eq!(id, fixture.library.id()),
        other => panic!(
            "a second create was not refused: {:?}",
            other.map(|l| l.id())
        ),
    }
    let opened = Library::open_or_create(db, "second", registry())
        .await
        .expect("open or create");
    assert_eq!(opened.id(), fixture.library.id());
    fixture
}

/// The commit watcher, on a pool of one connection, leaves that connection to the app and
/// still notices another process's commits.
async fn the_commit_watcher_keeps_no_connection_of_a_one_connection_pool(
    fixture: Fixture,
) -> Fixture {
    let mut options = sea_orm::ConnectOptions::new(fixture.url.clone());
    options
        .max_connections(1)
        .acquire_timeout(DEADLINE)
        .sqlx_logging(false);
    let db = Database::connect(options).await.expect("connect");
    let watched = Library::open_default(db, registry()).await.expect("open");
    let _watcher = watched.watch_commits();
    let mut latest = watched.watch_latest_seq();
    // A write through the watched handle: its pool's one connection is free.
    let own = put_tag(&watched, "own").await;
    // Another process's write (the fixture's handle has its own pool): noticed.
    let other = put_tag(&fixture.library, "other").await;
    assert!(other > own);
    tokio::time::timeout(DEADLINE, async {
        while latest.get() < other {
            if latest.changed().await.is_none() {
                break;
            }
        }
    })
    .await
    .expect("the watcher noticed the other commit");
    assert_eq!(latest.get(), other);
    fixture
}

crate::on_every_backend!(
    create_is_refused_where_a_library_exists,
    the_commit_watcher_keeps_no_connection_of_a_one_connection_pool,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_runs_and_runs_again_on_the_same_databases() {
    let dir = tempfile::tempdir().expect("dir");
    for run in ["first", "second"] {
        tokio::time::timeout(WHOLE_TEST, quickstart::run(dir.path()))
            .await
            .unwrap_or_else(|_| panic!("the quickstart's {run} run did not finish in time"))
            .unwrap_or_else(|e| panic!("the quickstart's {run} run failed: {e:#}"));
    }
    // One library on each side, with both runs' notes.
    use sea_orm::{EntityTrait, PaginatorTrait};
    let registry = || {
        sync_core::Registry::new()
            .register::<quickstart::note::Entity>()
            .expect("registry")
    };
    let leader = Library::open_default(
        default_pool_plain(dir.path(), "leader.db").await,
        registry(),
    )
    .await
    .expect("leader");
    let follower = Library::open_default(
        default_pool_plain(dir.path(), "follower.db").await,
        registry(),
    )
    .await
    .expect("follower");
    assert_eq!(leader.id(), follower.id());
    for library in [&leader, &follower] {
        let notes = quickstart::note::Entity::find()
            .count(library.db())
            .await
            .expect("count");
        assert_eq!(notes, 2);
    }
}

/// A default-pool connection without the example app's migrations.
async fn default_pool_plain(dir: &Path, file: &str) -> DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.join(file).display());
    Database::connect(url).await.expect("connect")
}

#[test]
fn the_readme_s_first_code_block_is_the_quickstart_example() {
    let readme = include_str!("../../README.md");
    let example = include_str!("../../example-app/examples/quickstart.rs");
    let fence = readme.find("```").expect("a code block in the README");
    let start = fence + "```rust\n".len();
    assert_eq!(
        &readme[fence..start],
        "```rust\n",
        "README.md's first code block is Rust"
    );
    let length = readme[start..].find("\n```\n").expect("the block's end") + 1;
    assert!(
        readme[start..start + length] == *example,
        "README.md's first code block differs from example-app/examples/quickstart.rs: copy the file into it"
    );
}
