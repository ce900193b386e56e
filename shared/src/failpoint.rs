//! Crash points for the fault-injection suite (`tests/tests/faults.rs`).
//!
//! A process started with `BATON_FAILPOINTS=name[,name…]` and
//! `BATON_FAILPOINT_DIR=DIR` aborts (like a SIGKILL: no cleanup, no flush) the
//! first time it reaches a named point, leaving `DIR/name` behind so its
//! restarted successor goes on. `name!` aborts every time (a poison message).
//! Without the variables a point costs one environment lookup, done once.

use std::sync::OnceLock;

fn armed() -> &'static Option<(Vec<String>, std::path::PathBuf)> {
    static ARMED: OnceLock<Option<(Vec<String>, std::path::PathBuf)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let names = std::env::var("BATON_FAILPOINTS").ok()?;
        let dir = std::env::var("BATON_FAILPOINT_DIR").ok()?;
        Some((names.split(',').map(str::to_owned).collect(), dir.into()))
    })
}

/// Whether any point is armed (to skip building a point's name otherwise).
pub fn is_armed() -> bool {
    armed().is_some()
}

/// Aborts the process here if the point `name` is armed.
pub fn hit(name: &str) {
    let Some((names, dir)) = armed() else { return };
    let always = names.iter().any(|n| n.strip_suffix('!') == Some(name));
    let once = names.iter().any(|n| n == name);
    if !(always || once) {
        return;
    }
    if once {
        let marker = dir.join(name);
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_err()
        {
            return;
        }
    }
    eprintln!("failpoint {name}: aborting");
    std::process::abort();
}

/// Pause points: a process started with `BATON_PAUSEPOINTS=name:ms[,name:ms…]`
/// sleeps `ms` milliseconds each time it reaches a named point, to make a slow
/// start (or a slow step) happen on demand in tests. Without the variable a
/// point costs one environment lookup, done once.
fn pauses() -> &'static Vec<(String, std::time::Duration)> {
    static PAUSES: OnceLock<Vec<(String, std::time::Duration)>> = OnceLock::new();
    PAUSES.get_or_init(|| {
        let Ok(spec) = std::env::var("BATON_PAUSEPOINTS") else {
            return Vec::new();
        };
        spec.split(',')
            .filter_map(|item| {
                let (name, ms) = item.split_once(':')?;
                let ms = ms.trim().parse::<u64>().ok()?;
                Some((name.trim().to_owned(), std::time::Duration::from_millis(ms)))
            })
            .collect()
    })
}

/// Sleeps here if the pause point `name` is armed.
pub async fn pause(name: &str) {
    if let Some((_, d)) = pauses().iter().find(|(n, _)| n == name) {
        eprintln!("pause point {name}: sleeping {} ms", d.as_millis());
        tokio::time::sleep(*d).await;
    }
}
