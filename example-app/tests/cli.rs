//! The CLI as a user runs it: one process per command, on SQLite and (when
//! `SYNC_TEST_POSTGRES_URL` is set) PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output};

struct Cli {
    db: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_example-app"))
            .arg("--db")
            .arg(&self.db)
            .args(args)
            .env_remove("EXAMPLE_APP_DB")
            .output()
            .expect("run example-app")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// A command that must fail with a one-line error and no panic.
    fn fails(&self, args: &[&str], expect: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line expected, got {stderr}"
        );
        assert!(
            stderr.contains(expect),
            "{args:?}: expected `{expect}` in {stderr}"
        );
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).expect("JSON output")
}

fn walkthrough(cli: &Cli) {
    cli.fails(&["status", "--json"], "init");
    cli.ok(&["init", "--library-name", "Films"]);
    cli.fails(&["init"], "already holds a library");

    let volume = json(&cli.ok(&[
        "put",
        "volume",
        r#"{"name":"Disk","mount_point":"/mnt/a","total_capacity":7}"#,
    ]));
    let id = volume["id"].as_str().expect("id").to_owned();
    assert_eq!(volume["mount_point"], "/mnt/a");
    let updated = json(&cli.ok(&[
        "put",
        "volume",
        &format!(r#"{{"id":"{id}","color":"red"}}"#),
    ]));
    assert_eq!(updated["color"], "red");
    assert_eq!(
        updated["name"], "Disk",
        "an update keeps the fields it was not given"
    );
    assert_eq!(json(&cli.ok(&["get", "volume", &id])), updated);
    cli.ok(&["put", "user_metadata", r#"{"tags":["a","b"]}"#]);
    cli.ok(&["put", "temp_file", r#"{"path":"/tmp/x"}"#]);

    let log: Vec<serde_json::Value> = cli.ok(&["log"]).lines().map(json).collect();
    assert_eq!(
        log.len(),
        3,
        "two volume writes and one user_metadata insert; temp_file never syncs"
    );
    for (i, entry) in log.iter().enumerate() {
        assert_eq!(entry["seq"], i as u64 + 1);
        for key in ["model", "record_id", "op", "device_id", "hlc"] {
            assert!(entry.get(key).is_some(), "log line lacks {key}");
        }
    }
    assert_eq!(
        cli.ok(&["log", "--from", "2", "--limit", "1"])
            .lines()
            .count(),
        1
    );

    let dump = json(&cli.ok(&["dump"]));
    assert_eq!(dump["volume"][0]["color"], "red");
    assert!(
        dump["volume"][0].get("mount_point").is_none(),
        "dump holds synced fields only"
    );
    assert!(dump.get("temp_file").is_none());

    cli.ok(&["delete", "volume", &id]);
    let out = cli.run(&["get", "volume", &id]);
    assert!(
        !out.status.success(),
        "get of a deleted record exits non-zero"
    );

    let status = json(&cli.ok(&["status", "--json"]));
    assert_eq!(status["role"], "leader");
    assert_eq!(status["latest_seq"], 4);
    for key in ["library_id", "device_id"] {
        assert!(status[key].is_string());
    }

    let report = json(&cli.ok(&["load", "--count", "60", "--concurrency", "3", "--seed", "9"]));
    assert_eq!(report["writes"], 60);
    let before = json(&cli.ok(&["status", "--json"]))["latest_seq"]
        .as_u64()
        .unwrap();
    cli.ok(&["load", "--count", "30", "--no-sync"]);
    let after = json(&cli.ok(&["status", "--json"]))["latest_seq"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after, "--no-sync writes are not recorded");

    cli.fails(&["put", "nope", "{}"], "unknown model");
    cli.fails(&["put", "tag", "{oops"], "not valid JSON");
    cli.fails(&["put", "tag", "[1]"], "JSON object");
    cli.fails(
        &["put", "volume", r#"{"total_capacity":"lots"}"#],
        "does not fit",
    );
    cli.fails(&["get", "tag", "not-a-uuid"], "not a valid id");
    cli.fails(
        &["delete", "tag", &uuid::Uuid::now_v7().to_string()],
        "no tag with id",
    );
}

#[test]
fn commands_work_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("cli.db").display());
    walkthrough(&Cli { db });
}

#[test]
fn commands_work_on_postgres() {
    let Some(server) = std::env::var("SYNC_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED commands_work_on_postgres: SYNC_TEST_POSTGRES_URL is not set"
        );
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = runtime
        .block_on(example_app::fresh_database(&server, dir.path()))
        .unwrap();
    walkthrough(&Cli { db });
}

#[test]
fn an_unreachable_database_is_a_clear_error() {
    let cli = Cli {
        db: "postgres://nobody@127.0.0.1:1/none".into(),
    };
    cli.fails(&["status"], "cannot open database");
}

#[test]
fn the_demo_runs_and_its_follower_matches_the_leader() {
    let out = Command::new(env!("CARGO_BIN_EXE_example-app"))
        .arg("demo")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checksum chain verified"), "{stdout}");
    assert!(
        stdout.contains("leader and follower hold identical synced data"),
        "{stdout}"
    );
}
