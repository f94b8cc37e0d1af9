//! Fresh databases per test, on every backend the environment offers.

use std::future::Future;
use std::io::Write;

use example_app::{Migrator, connect, drop_database, fresh_database, registry};
use sea_orm_migration::MigratorTrait;
use sync_core::Library;

/// Environment variables naming the database servers for the backend tests.
pub const POSTGRES_ENV: &str = "SYNC_TEST_POSTGRES_URL";
pub const MYSQL_ENV: &str = "SYNC_TEST_MYSQL_URL";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

/// A library led by a fresh device on a fresh database, dropped (on servers) afterwards.
pub struct Fixture {
    pub library: Library,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// Says, past the test harness's output capture, that a test did not run.
pub fn say_skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The server URL for `backend`, or `None` (having said so) when its variable is unset.
pub fn server_url(backend: Backend, test: &str) -> Option<String> {
    let var = match backend {
        Backend::Sqlite => return Some("sqlite".to_owned()),
        Backend::Postgres => POSTGRES_ENV,
        Backend::Mysql => MYSQL_ENV,
    };
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            say_skipped(test, &format!("{var} is not set"));
            None
        }
    }
}

pub async fn fixture(backend: Backend, test: &str) -> Option<Fixture> {
    let server = server_url(backend, test)?;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let db = connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let library = Library::create(db, "test", registry())
        .await
        .expect("create library");
    Some(Fixture {
        library,
        url,
        _dir: dir,
    })
}

impl Fixture {
    /// Drops the server-side database. SQLite files go with the temp dir.
    pub async fn finish(self) {
        let Fixture { library, url, .. } = self;
        let _ = library.db().clone().close().await;
        // Best effort: a leftover test database is untidy, not wrong.
        let _ = drop_database(&url).await;
    }
}

/// Runs `case` on a fresh fixture of `backend`, or says it is skipped.
pub async fn run<F, Fut>(backend: Backend, test: &str, case: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = Fixture>,
{
    if let Some(fixture) = fixture(backend, test).await {
        case(fixture).await.finish().await;
    }
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Fixture) -> Fixture`.
#[macro_export]
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::support::run($crate::support::Backend::Sqlite, concat!(module_path!(), "::", stringify!($case)), super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::support::run($crate::support::Backend::Postgres, concat!(module_path!(), "::", stringify!($case)), super::$case).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::support::run($crate::support::Backend::Mysql, concat!(module_path!(), "::", stringify!($case)), super::$case).await;
                }
            )*
        }
    };
}
