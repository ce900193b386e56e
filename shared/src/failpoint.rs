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
