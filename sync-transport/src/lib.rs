//! QUIC transport for sync-core: a leader serves the libraries it leads, followers join
//! with a token, pull, and hear new seqs as soon as they commit.
//!
//! - [`Server`] serves every library this device leads, to their members only.
//! - [`Client`] joins a library ([`JoinToken`]) and opens [`Session`]s; [`QuicTransport`]
//!   plugs a session into `sync_core`'s follow loop.
//! - Both sides authenticate with their device key over TLS 1.3 ([`tls`](crate::tls)):
//!   the follower pins the leader's key, the leader admits its library's members.
//! - Every message is one bounded frame ([`frame`]).
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod client;
pub mod frame;
mod server;
mod tls;
mod token;

pub use client::{Client, ClientConfig, FAILOVER_IDLE_TIMEOUT, Joined, QuicTransport, Session};
pub use frame::{FrameError, MovedTo, Refusal};
pub use server::{Server, ServerConfig};
pub use token::{JoinToken, TokenError};

use sync_core::{DeviceId, KeyFingerprint};

/// Why a transport operation failed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The local setup is wrong (a key, a listen address).
    #[error("transport setup: {0}")]
    Config(String),
    /// The leader's address does not resolve.
    #[error("cannot resolve the leader's address {0}")]
    Address(String),
    /// The leader did not answer.
    #[error(
        "cannot reach the leader at {address}: {reason}; is a `Server` bound there and \
         running? If the leader moved, connect to its new address (the pin stays)"
    )]
    Unreachable {
        /// Where we tried.
        address: String,
        /// What happened.
        reason: String,
    },
    /// The device at the address is not the pinned leader.
    #[error(
        "the device at {address} is not this library's leader: it presented key {found}, but \
         this follower pins {expected}. Check the address; if the leader's key really \
         changed, join again with a new invite"
    )]
    WrongLeader {
        /// Where we connected.
        address: String,
        /// The pinned key.
        expected: KeyFingerprint,
        /// The key it presented.
        found: KeyFingerprint,
    },
    /// The leader refused.
    #[error("the leader refused: {message}")]
    Refused {
        /// What kind of refusal.
        code: Refusal,
        /// The leader's explanation.
        message: String,
    },
    /// The leader refused a pull: its log is not this follower's history
    /// (`Refusal::HistoryDiverged`; `QuicTransport` hands it on as
    /// `PullError::HistoryDiverged`).
    #[error("the leader refused: {0}")]
    HistoryDiverged(sync_core::Divergence),
    /// The device asked no longer leads: a newer epoch exists (`Refusal::Superseded`;
    /// `QuicTransport` hands it on as `PullError::Superseded`/`PushError::Superseded`).
    #[error("the leader refused: {message}")]
    Superseded {
        /// The newer epoch.
        epoch: sync_core::Epoch,
        /// The leader's explanation.
        message: String,
    },
    /// The device asked does not lead the library: it handed leadership on, or never led
    /// it (`Refusal::Moved`; `QuicTransport` hands it on as `PullError::Moved`/
    /// `PushError::Moved`, and re-points when the follow loop asks it to).
    #[error("the device asked does not lead the library: {message}")]
    Moved {
        /// The leader's epoch.
        epoch: sync_core::Epoch,
        /// The leader now.
        leader: DeviceId,
        /// Where it listens, as far as known.
        addresses: Vec<String>,
        /// The explanation.
        message: String,
    },
    /// The connection was lost.
    #[error("connection to the leader lost: {0}")]
    Lost(String),
    /// A deadline passed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A frame was malformed or too large.
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A socket failed.
    #[error("socket: {0}")]
    Io(std::io::Error),
}

impl TransportError {
    /// Whether the leader may answer at another of its addresses (another server process
    /// on its database): this one is not reachable, or is not the leader. A refusal of
    /// this device is not such a failure: every process of the leader would refuse alike.
    pub fn another_address_may_answer(&self) -> bool {
        match self {
            TransportError::Address(_)
            | TransportError::Unreachable { .. }
            | TransportError::WrongLeader { .. }
            | TransportError::Lost(_)
            | TransportError::Timeout(_)
            | TransportError::Io(_) => true,
            TransportError::Refused { code, .. } => *code == Refusal::Internal,
            TransportError::Config(_)
            | TransportError::HistoryDiverged(_)
            // Every process of a replaced leader shares its database, and its epoch.
            | TransportError::Superseded { .. }
            | TransportError::Moved { .. }
            | TransportError::Frame(_)
            | TransportError::Protocol(_) => false,
        }
    }

    /// A copy of a refusal (the one kind kept and reported again).
    fn clone_refusal(&self) -> TransportError {
        match self {
            TransportError::Refused { code, message } => TransportError::Refused {
                code: *code,
                message: message.clone(),
            },
            other => TransportError::Lost(other.to_string()),
        }
    }
}
