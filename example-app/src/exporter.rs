//! `serve --metrics ADDR` and `follow --metrics ADDR`: sync-core's and sync-transport's
//! metrics (listed in `sync_core::metrics`) for Prometheus to scrape.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Upper bounds of the duration histograms' buckets, in seconds: from an apply of a few
/// entries on SQLite (well under a millisecond) to a push over a slow link.
const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the Prometheus exporter as this process's metrics recorder, serving the
/// metrics over HTTP on `addr` (any path answers; `/metrics` by convention), and returns
/// the address it listens on. Port 0 picks a free port. Call it inside the Tokio runtime
/// (the listener runs on it), at most once per process.
pub fn install(addr: SocketAddr) -> Result<SocketAddr> {
    // The exporter binds its listener itself and does not say where, so a free port is
    // found first: the OS may hand it to someone else in the moment between, in which
    // case the bind below fails with an error rather than listening elsewhere.
    let addr = if addr.port() == 0 {
        std::net::TcpListener::bind(addr)
            .and_then(|probe| probe.local_addr())
            .with_context(|| format!("cannot find a free port for metrics on {addr}"))?
    } else {
        addr
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            DURATION_BUCKETS_SECONDS,
        )?
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    sync_core::metrics::describe();
    Ok(addr)
}
