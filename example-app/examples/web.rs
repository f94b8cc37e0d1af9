//! The example web app: a blog (`example_app::web`) run as a leader and a write-role
//! follower, each with its own SQLite database and HTTP API, syncing over QUIC.
//!
//! `cargo run -p example-app --example web [DIR]`, then, for example:
//!
//! ```text
//! curl -X POST -H 'content-type: application/json' -d '{"name":"Ada"}' http://LEADER/authors
//! curl http://FOLLOWER/authors
//! ```
//!
//! Ctrl-C stops both.

use std::path::PathBuf;

use example_app::web::Blog;
use sync_core::Access;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("seaorm-sync-web"),
    };
    std::fs::create_dir_all(&dir)?;
    let url = |file: &str| format!("sqlite://{}?mode=rwc", dir.join(file).display());
    let leader = Blog::leader(&url("leader.db")).await?;
    let token = leader.invite(Access::Write).await?;
    let follower = Blog::follower(&url("follower.db"), &token).await?;
    println!("leader:   http://{}", leader.http);
    println!("follower: http://{}", follower.http);
    tokio::signal::ctrl_c().await?;
    follower.stop().await;
    leader.stop().await;
    Ok(())
}
