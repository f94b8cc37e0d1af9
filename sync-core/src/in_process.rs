//! The in-process transport: a follower's requests served by a leader `Library` in the same
//! process. A shell like the QUIC transport (it spawns a task and reaches the database), so
//! it lives outside `protocol.rs`, whose types do no I/O.

use crate::protocol::{
    PullError, PullRequest, PullResponse, PushError, PushRequest, PushResponse, Transport,
    VoteError, VoteRequest, VoteResponse,
};
use crate::{LeaderView, Library};

/// A transport to a leader in the same process (tests, benchmarks, embedding).
#[derive(Clone, Debug)]
pub struct InProcess {
    leader: LeaderView,
}

impl InProcess {
    /// Pulls from and pushes to `leader` (`Library::leader`).
    pub fn new(leader: LeaderView) -> InProcess {
        InProcess { leader }
    }
}

#[async_trait::async_trait]
impl Transport for InProcess {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        // On a task of its own, as a leader elsewhere would serve: the leader's reading then
        // runs beside the follower's applying (catch-up fetches ahead) on another thread.
        let leader = self.leader.clone();
        match tokio::spawn(async move { leader.serve_pull(&request).await }).await {
            Ok(served) => served,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(PullError::Transport(
                "the in-process leader stopped (the runtime is shutting down)".into(),
            )),
        }
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        self.leader.serve_push(&request).await
    }
}

/// A transport to another member in the same process, whatever its role: it answers vote
/// requests (`Library::answer_vote`) and serves the log it holds
/// (`Library::serve_held_pull`), what a member promoting itself asks of the others.
#[derive(Clone, Debug)]
pub struct InProcessMember {
    member: Library,
}

impl InProcessMember {
    /// Asks `member`.
    pub fn new(member: Library) -> InProcessMember {
        InProcessMember { member }
    }
}

#[async_trait::async_trait]
impl Transport for InProcessMember {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        self.member.serve_held_pull(&request).await
    }

    async fn vote(&self, request: VoteRequest) -> Result<VoteResponse, VoteError> {
        self.member.answer_vote(&request).await
    }
}
