//! The protocol's decisions, without I/O: each function here takes what the shell loaded
//! (and the time, where time matters) and returns what to do. Nothing in this module
//! holds a database connection, a socket, a task or a clock of its own; `follower.rs`,
//! `take.rs` and `follow_loop.rs` are the async shells that load, call these, and execute
//! the answer (quinn-proto's split: a state machine driven by a thin shell).
//!
//! - `absorb`: how a follower absorbs pulled responses (continuity, chain, known models
//!   and schema versions → runs per model, parked entries, the new position, or a
//!   refusal).
//! - `take`: the leader's plan for one pushed change (already taken, rejected, answered
//!   for a local row, or merged by `merge::decide`).
//! - `follow`: the follow loop's backoff and stall detection.
//! - `collapse`: which entries of a range a follower needs (selective sync, collapsing).
//! - `epoch`: epoch fencing (a stale answer, a request from a newer epoch) and whether a
//!   move record is to be trusted.
//! - `rewind`: the old leader's return (what becomes of the entries after the fork).
//! - `promote`: promotion after a lost leader (the vote rule, the tally, which of two
//!   leaders wins, the lost range).
//!
//! `merge.rs` (the merge decision) is pure too and stays where it is.

pub(crate) mod absorb;
pub(crate) mod collapse;
pub(crate) mod epoch;
pub(crate) mod follow;
pub(crate) mod promote;
pub(crate) mod rewind;
pub(crate) mod take;
