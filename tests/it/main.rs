//! The workspace's integration tests, in one binary.
//!
//! Backend tests run on SQLite always, and on PostgreSQL and MySQL/MariaDB when
//! `SYNC_TEST_POSTGRES_URL` / `SYNC_TEST_MYSQL_URL` name a server (each test makes and drops
//! its own database); otherwise they print `SKIPPED …` on stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod all_types;
mod capture;
mod cascades;
mod crowd;
mod dense;
mod derive;
mod failover;
mod follow_state;
mod follower;
mod follower_audit;
mod foreign_keys;
mod handle;
mod int_keys;
mod leadership;
mod offline;
mod ordering;
mod quic;
mod robust;
mod roles;
mod scaleout;
mod seeds;
mod set_aside;
mod simulation;
mod startup;
mod support;
mod telemetry;
mod web;
