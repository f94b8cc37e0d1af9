//! Runs many seeded simulations: `cargo run --release -p sync-tests --bin simulate --
//! --seeds N [--first S] [--steps K]`. Ends with `N passed, M failed` and the failing
//! seeds; `SYNC_SIM_SEED=<seed>` runs that one seed and prints why it failed.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut seeds = 100u64;
    let mut first = 1u64;
    let mut steps = sync_tests::sim::STEPS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} takes a number"))?
                .parse()
                .with_context(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--seeds" => seeds = value("--seeds")?,
            "--first" => first = value("--first")?,
            "--steps" => steps = value("--steps")? as usize,
            other => bail!("unknown argument `{other}` (use --seeds N, --first S, --steps K)"),
        }
    }
    if let Ok(seed) = std::env::var("SYNC_SIM_SEED") {
        first = seed.parse().context("SYNC_SIM_SEED takes a number")?;
        seeds = 1;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let (passed, failed) = runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let template = sync_tests::sim::template(dir.path()).await?;
        let mut passed = 0u64;
        let mut failed = Vec::new();
        for seed in first..first.saturating_add(seeds) {
            let run_dir = tempfile::tempdir_in(dir.path())?;
            match sync_tests::sim::run(seed, steps, &template, run_dir.path()).await {
                Ok(outcome) => {
                    if seeds == 1 {
                        println!("seed {seed}: {outcome:?}");
                    }
                    passed += 1
                }
                Err(e) => {
                    eprintln!("seed {seed} failed: {e:#}");
                    failed.push(seed);
                }
            }
            let done = seed - first + 1;
            if done.is_multiple_of(250) && done < seeds {
                eprintln!(
                    "{done} of {seeds} seeds run, {} failed, {:.0} s",
                    failed.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        anyhow::Ok((passed, failed))
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{passed} passed, {} failed ({:.0} seeds/min){}",
        failed.len(),
        (passed + failed.len() as u64) as f64 / elapsed * 60.0,
        if failed.is_empty() {
            String::new()
        } else {
            format!(
                "; failing seeds: {}",
                failed
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    Ok(failed.is_empty())
}
