//! The example web app (`example_app::web`, an axum blog with integer keys, a relation, the
//! dense entity format, a seed migration and plain SeaORM calls in its handlers), run as two
//! instances that sync over QUIC, driven over HTTP as its users would.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use example_app::web::{Blog, SEED_AUTHOR, author};
use example_app::{drop_database, fresh_database};
use sea_orm::ActiveValue::Set;
use sea_orm::EntityTrait;
use sea_orm_migration::MigratorTrait;
use serde_json::{Value, json};
use sync_core::{Access, OpenError};

use crate::support::{Backend, server_url};

/// Everything the test does: a hang fails it instead of stalling the run.
const WHOLE_TEST: Duration = Duration::from_secs(180);
/// How long a change may take to reach the other instance.
const DEADLINE: Duration = Duration::from_secs(30);

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Value {
        let response = request.send().await.expect("request");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert!(status.is_success(), "{status}: {body}");
        body
    }

    /// A request whose answer may be a refusal: its status and body.
    async fn answer(&self, request: reqwest::RequestBuilder) -> (reqwest::StatusCode, Value) {
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.expect("JSON body"))
    }

    async fn get(&self, path: &str) -> Value {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> Value {
        self.send(self.http.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn delete(&self, path: &str) -> Value {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// Author name → this instance's integer id.
    async fn author_ids(&self) -> BTreeMap<String, i64> {
        self.get("/authors")
            .await
            .as_array()
            .expect("authors")
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().expect("name").to_owned(),
                    a["id"].as_i64().expect("id"),
                )
            })
            .collect()
    }

    /// Every post as (title, author name, author id).
    async fn posts(&self) -> Vec<(String, String, i64)> {
        let mut posts: Vec<_> = self
            .get("/posts")
            .await
            .as_array()
            .expect("posts")
            .iter()
            .map(|p| {
                (
                    p["title"].as_str().expect("title").to_owned(),
                    p["author"]
                        .as_str()
                        .unwrap_or("(missing author)")
                        .to_owned(),
                    p["author_id"].as_i64().expect("author_id"),
                )
            })
            .collect();
        posts.sort();
        posts
    }
}

/// Polls `check` until it holds, for at most `DEADLINE`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blog_syncs_between_two_instances_over_http() {
    on(
        Backend::Sqlite,
        "web::the_blog_syncs_between_two_instances_over_http",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blog_syncs_between_two_instances_on_postgresql() {
    on(
        Backend::Postgres,
        "web::the_blog_syncs_between_two_instances_on_postgresql",
    )
    .await;
}

/// Both instances on fresh databases of `backend`.
async fn on(backend: Backend, test: &str) {
    let Some(server) = server_url(backend, test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let leader = fresh_database(&server, dir.path()).await.expect("database");
    let follower = fresh_database(&server, dir.path()).await.expect("database");
    tokio::time::timeout(WHOLE_TEST, blog_case(&leader, &follower))
        .await
        .expect("the test did not finish in time");
    for url in [leader, follower] {
        // Best effort: a leftover test database is untidy, not wrong.
        let _ = drop_database(&url).await;
    }
}

async fn blog_case(leader_url: &str, follower_url: &str) {
    let leader = Blog::leader(leader_url).await.expect("leader");
    let l = Api::new(leader.http);
    l.post("/authors", json!({"name": "Ada"})).await;

    let token = leader.invite(Access::Write).await.expect("invite");
    let follower = Blog::follower(follower_url, &token)
        .await
        .expect("follower");
    let f = Api::new(follower.http);
    eventually("Ada reaches the follower", || async {
        f.author_ids().await.contains_key("Ada")
    })
    .await;

    // Both write authors before they hear of each other's: each device numbers them in its
    // own sequence, so the same records end with other integer ids on the other device.
    let cy = f.post("/authors", json!({"name": "Cy"})).await["id"].clone();
    let dee = l.post("/authors", json!({"name": "Dee"})).await["id"].clone();
    l.post("/authors", json!({"name": "Eve"})).await;
    f.post("/posts", json!({"author_id": cy, "title": "by Cy"}))
        .await;
    l.post("/posts", json!({"author_id": dee, "title": "by Dee"}))
        .await;

    eventually("both posts on both instances", || async {
        l.posts().await.len() == 2 && f.posts().await.len() == 2
    })
    .await;
    for api in [&l, &f] {
        let ids = api.author_ids().await;
        // The seed is one record everywhere: once on each device (a list, not the map,
        // so that a second copy would show).
        let mut names: Vec<String> = api
            .get("/authors")
            .await
            .as_array()
            .expect("authors")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["Ada", SEED_AUTHOR, "Cy", "Dee", "Eve"]);
        // Every post names its author, by this device's integer id.
        let posts = api.posts().await;
        assert_eq!(
            posts,
            vec![
                ("by Cy".to_owned(), "Cy".to_owned(), ids["Cy"]),
                ("by Dee".to_owned(), "Dee".to_owned(), ids["Dee"]),
            ]
        );
    }
    let (on_leader, on_follower) = (l.author_ids().await, f.author_ids().await);
    assert!(
        ["Cy", "Dee", "Eve"]
            .iter()
            .any(|name| on_leader[*name] != on_follower[*name]),
        "the premise: some author has another integer id on each device ({on_leader:?}, {on_follower:?})"
    );

    // An edit on the follower reaches the leader.
    let cy_post = f
        .get("/posts")
        .await
        .as_array()
        .expect("posts")
        .iter()
        .find(|p| p["title"] == "by Cy")
        .expect("Cy's post")["id"]
        .clone();
    f.put(
        &format!("/posts/{cy_post}"),
        json!({"title": "by Cy, edited"}),
    )
    .await;
    eventually("the edit reaches the leader", || async {
        l.posts().await.iter().any(|p| p.0 == "by Cy, edited")
    })
    .await;

    // A `delete_many` in a handler on the leader removes Dee's posts everywhere.
    let dee_on_leader = l.author_ids().await["Dee"];
    let deleted = l.delete(&format!("/posts?author_id={dee_on_leader}")).await;
    assert_eq!(deleted["deleted"], 1);
    eventually("the delete reaches the follower", || async {
        f.posts().await.iter().all(|p| p.1 != "Dee")
    })
    .await;
    let titles = |posts: Vec<(String, String, i64)>| {
        posts
            .into_iter()
            .map(|(title, author, _)| (title, author))
            .collect::<Vec<_>>()
    };
    assert_eq!(titles(l.posts().await), titles(f.posts().await));

    follower.stop().await;
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blog_answers_refusals_with_their_status_and_a_refused_join_keeps_its_invite() {
    let dir = tempfile::tempdir().expect("dir");
    let mut urls = Vec::new();
    for _ in 0..3 {
        urls.push(
            fresh_database("sqlite", dir.path())
                .await
                .expect("database"),
        );
    }
    tokio::time::timeout(WHOLE_TEST, refusals_case(&urls[0], &urls[1], &urls[2]))
        .await
        .expect("the test did not finish in time");
}

async fn refusals_case(leader_url: &str, occupied_url: &str, reader_url: &str) {
    let leader = Blog::leader(leader_url).await.expect("leader");
    let l = Api::new(leader.http);

    // A post by an author that does not exist: the database's foreign key refuses it, a
    // conflict with the stored data, not a server error.
    let (status, body) = l
        .answer(
            l.http
                .post(format!("{}/posts", l.base))
                .json(&json!({"author_id": 9_999, "title": "by nobody"})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.to_ascii_lowercase().contains("foreign key")),
        "{body}"
    );

    // A database with rows of its own cannot join as a read member; the refusal comes
    // before the invite is redeemed, so the same invite still admits an empty database.
    let token = leader.invite(Access::Read).await.expect("invite");
    let occupied = example_app::connect(occupied_url).await.expect("connect");
    example_app::web::Migrator::up(&occupied, None)
        .await
        .expect("migrate");
    author::Entity::insert(author::ActiveModel {
        sync_key: Set(uuid::Uuid::now_v7()),
        name: Set("Mine".into()),
        ..Default::default()
    })
    .exec_without_returning(&occupied)
    .await
    .expect("a row of its own");
    let _ = occupied.close().await;
    let refused = match Blog::follower(occupied_url, &token).await {
        Ok(blog) => {
            blog.stop().await;
            panic!("a read member with rows of its own joined");
        }
        Err(e) => e,
    };
    assert!(
        matches!(
            refused.downcast_ref::<OpenError>(),
            Some(OpenError::RowsBeforeJoin { .. })
        ),
        "{refused:#}"
    );
    let reader = Blog::follower(reader_url, &token)
        .await
        .expect("the refused join left the invite unused");
    let r = Api::new(reader.http);

    // A write on a read member: forbidden, with the library's message.
    let (status, body) = r
        .answer(
            r.http
                .post(format!("{}/authors", r.base))
                .json(&json!({"name": "Zed"})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("read access")),
        "{body}"
    );

    reader.stop().await;
    leader.stop().await;
}
