//! A small blog, written the way SeaORM apps usually are, with sync added: two models with
//! `i32` auto-increment keys in SeaORM 2's dense entity format (`#[sea_orm::model]`), a
//! relation between them, a migration that seeds a row, and axum handlers that use plain
//! SeaORM calls (`insert`, `update`, `find`, `delete_many`) on a connection.
//!
//! What sync changed in it, and nothing else: `sync_core::Syncable` in each model's derive
//! list with a `#[sync(key)]` column, the sync tables in the `Migrator`, the seed keyed by
//! `sync_core::seed_key`, `Library::open_or_create`, and the library's connection handle
//! (`Library::connection`) in the handlers' state where a `DatabaseConnection` was.
//!
//! [`Blog::leader`] and [`Blog::follower`] start one instance each: the library, its QUIC
//! side (serving, or following the leader) and the HTTP server, on loopback ports of the
//! system's choosing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Database, DbErr, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, SqlErr,
};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};
use serde::Deserialize;
use serde_json::{Value, json};
use sync_core::{
    Access, Follow, FollowConfig, Library, OpenError, Registry, SyncConnection, WriteRefusal,
};
use sync_transport::{Client, ClientConfig, JoinToken, QuicTransport, Server, ServerConfig};
use tokio::sync::oneshot;

/// An author. The integer key stays this device's own; `sync_key` identifies the record
/// on every device.
pub mod author {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "author")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub name: String,
        #[sea_orm(has_many)]
        pub posts: HasMany<super::post::Entity>,
    }
}

/// A post by an author: `author_id` is an integer foreign key, sent to other devices as
/// the author's sync key and turned back into their own integer id.
pub mod post {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "post")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub author_id: i32,
        pub title: String,
        #[sea_orm(belongs_to, from = "author_id", to = "id")]
        pub author: HasOne<super::author::Entity>,
    }
}

/// The blog's synced models.
pub fn registry() -> Result<Registry> {
    Ok(Registry::new()
        .register::<author::Entity>()?
        .register::<post::Entity>()?)
}

/// The name of the author the seed migration adds on every device.
pub const SEED_AUTHOR: &str = "Anonymous";

/// The blog's `Migrator`: the sync tables, its own tables, and a seed.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = sync_migrations::migrations();
        all.push(Box::new(CreateTables));
        all.push(Box::new(SeedAuthor));
        all
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20260101_000001_create_blog"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = sea_orm::Schema::new(manager.get_database_backend());
        manager
            .create_table(schema.create_table_from_entity(author::Entity).to_owned())
            .await?;
        manager
            .create_table(schema.create_table_from_entity(post::Entity).to_owned())
            .await
    }
}

/// Seed data, written the usual way (no library exists while migrations run), keyed by
/// `seed_key` so that every device's seed is the same record.
struct SeedAuthor;

impl MigrationName for SeedAuthor {
    fn name(&self) -> &str {
        "m20260101_000002_seed_author"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SeedAuthor {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        author::Entity::insert(author::ActiveModel {
            sync_key: Set(sync_core::seed_key("author", SEED_AUTHOR)),
            name: Set(SEED_AUTHOR.to_owned()),
            ..Default::default()
        })
        .exec_without_returning(manager.get_connection())
        .await
        .map(|_| ())
    }
}

/// The handlers' state: where the app kept its `DatabaseConnection`.
#[derive(Clone)]
struct AppState {
    db: SyncConnection,
}

/// An error as the blog's API answers it.
struct ApiError(StatusCode, String);

impl From<DbErr> for ApiError {
    /// The library's refusals and the database's constraint errors are the caller's to
    /// fix, with the message that says how; anything else is the server's.
    fn from(e: DbErr) -> ApiError {
        let status = match WriteRefusal::of(&e) {
            // A read-access member: the write belongs on the leader or a write member.
            Some(WriteRefusal::ReadOnly) => StatusCode::FORBIDDEN,
            // A reference to a record that is not there (an unknown author).
            Some(WriteRefusal::MissingReference) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => match e.sql_err() {
                Some(
                    SqlErr::ForeignKeyConstraintViolation(_) | SqlErr::UniqueConstraintViolation(_),
                ) => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn author_json(a: &author::Model) -> Value {
    json!({ "id": a.id, "name": a.name })
}

fn post_json(p: &post::Model, author: Option<&author::Model>) -> Value {
    json!({
        "id": p.id,
        "title": p.title,
        "author_id": p.author_id,
        "author": author.map(|a| a.name.as_str()),
    })
}

#[derive(Deserialize)]
struct NewAuthor {
    name: String,
}

#[derive(Deserialize)]
struct NewPost {
    author_id: i32,
    title: String,
}

#[derive(Deserialize)]
struct EditPost {
    title: String,
}

#[derive(Deserialize)]
struct ByAuthor {
    author_id: i32,
}

async fn list_authors(State(s): State<AppState>) -> ApiResult {
    let authors = author::Entity::find()
        .order_by_asc(author::Column::Id)
        .all(&s.db)
        .await?;
    Ok(Json(authors.iter().map(author_json).collect()))
}

async fn create_author(State(s): State<AppState>, Json(new): Json<NewAuthor>) -> ApiResult {
    let author = author::ActiveModel {
        name: Set(new.name),
        ..Default::default()
    }
    .insert(&s.db)
    .await?;
    Ok(Json(author_json(&author)))
}

async fn list_posts(State(s): State<AppState>) -> ApiResult {
    let posts = post::Entity::find()
        .find_also_related(author::Entity)
        .order_by_asc(post::Column::Id)
        .all(&s.db)
        .await?;
    Ok(Json(
        posts
            .iter()
            .map(|(p, a)| post_json(p, a.as_ref()))
            .collect(),
    ))
}

async fn create_post(State(s): State<AppState>, Json(new): Json<NewPost>) -> ApiResult {
    let post = post::ActiveModel {
        author_id: Set(new.author_id),
        title: Set(new.title),
        ..Default::default()
    }
    .insert(&s.db)
    .await?;
    Ok(Json(post_json(&post, None)))
}

async fn edit_post(
    State(s): State<AppState>,
    Path(id): Path<i32>,
    Json(edit): Json<EditPost>,
) -> ApiResult {
    let Some(post) = post::Entity::find_by_id(id).one(&s.db).await? else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no post {id}")));
    };
    let mut post = post.into_active_model();
    post.title = Set(edit.title);
    let post = post.update(&s.db).await?;
    Ok(Json(post_json(&post, None)))
}

async fn delete_posts(State(s): State<AppState>, Query(by): Query<ByAuthor>) -> ApiResult {
    let deleted = post::Entity::delete_many()
        .filter(post::Column::AuthorId.eq(by.author_id))
        .exec(&s.db)
        .await?;
    Ok(Json(json!({ "deleted": deleted.rows_affected })))
}

/// The blog's HTTP API on a connection.
pub fn router(db: SyncConnection) -> Router {
    Router::new()
        .route("/authors", get(list_authors).post(create_author))
        .route(
            "/posts",
            get(list_posts).post(create_post).delete(delete_posts),
        )
        .route("/posts/{id}", axum::routing::put(edit_post))
        .with_state(AppState { db })
}

/// One running instance of the blog: its library, its sync side and its HTTP server.
pub struct Blog {
    /// The library (for invites, status and tests).
    pub library: Library,
    /// Where the HTTP API listens.
    pub http: SocketAddr,
    /// Where the leader serves sync, on the leader.
    pub sync: Option<SocketAddr>,
    server: Option<Server>,
    follow: Option<Follow>,
    stop_http: Option<oneshot::Sender<()>>,
    http_task: tokio::task::JoinHandle<()>,
}

impl Blog {
    /// A leader on the database at `url` (created on its first start).
    pub async fn leader(url: &str) -> Result<Blog> {
        let db = Database::connect(url).await?;
        Migrator::up(&db, None).await?;
        let library = Library::open_or_create(db, "Blog", registry()?).await?;
        let key = library.device_key().await?;
        let server = Server::bind(
            "127.0.0.1:0".parse()?,
            &key,
            vec![library.clone()],
            ServerConfig::default(),
        )
        .await?;
        let sync = server.local_addr();
        let mut blog = Blog::serve_http(library).await?;
        blog.sync = Some(sync);
        blog.server = Some(server);
        Ok(blog)
    }

    /// An invite to this leader, as the text a new device is given.
    pub async fn invite(&self, access: Access) -> Result<String> {
        let address = self.sync.context("only the leader invites")?;
        let invite = self
            .library
            .leader()?
            .invite(access, Duration::from_secs(600))
            .await?;
        let key = self.library.device_key().await?;
        Ok(JoinToken::new(&invite, &address.to_string(), key.fingerprint()).encode())
    }

    /// A follower on the database at `url`: joins with `token` on its first start, and
    /// follows the leader.
    pub async fn follower(url: &str, token: &str) -> Result<Blog> {
        let db = Database::connect(url).await?;
        Migrator::up(&db, None).await?;
        let token = JoinToken::decode(token)?;
        let client = Client::new(Library::device_key_of(&db).await?, ClientConfig::default());
        let library = match Library::open_default(db.clone(), registry()?).await {
            Ok(library) => library,
            Err(OpenError::NoLibrary) => {
                // Refused joins are refused before the invite is redeemed, not after.
                Library::check_join(&db, token.library_id, token.access, &registry()?).await?;
                let joined = client.join(&token, Some("blog follower")).await?;
                Library::join(
                    db,
                    joined.library_id,
                    joined.leader_device_id,
                    &joined.library_name,
                    joined.access,
                    registry()?,
                )
                .await?
            }
            Err(e) => return Err(e.into()),
        };
        let transport = Arc::new(QuicTransport::new(
            client,
            &token.address,
            token.fingerprint()?,
            library.id(),
        ));
        let follow = library
            .follower()?
            .start_following(transport, FollowConfig::default());
        let mut blog = Blog::serve_http(library).await?;
        blog.follow = Some(follow);
        Ok(blog)
    }

    async fn serve_http(library: Library) -> Result<Blog> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = listener.local_addr()?;
        let (stop_http, stopped) = oneshot::channel::<()>();
        let app = router(library.connection());
        let http_task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the blog's HTTP server stopped");
            }
        });
        Ok(Blog {
            library,
            http,
            sync: None,
            server: None,
            follow: None,
            stop_http: Some(stop_http),
            http_task,
        })
    }

    /// Stops serving and following.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.http_task).await;
        if let Some(follow) = self.follow.take() {
            follow.stop().await;
        }
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        if let Err(e) = self.library.db().clone().close().await {
            tracing::warn!(error = %e, "closing the blog's database failed");
        }
    }
}
