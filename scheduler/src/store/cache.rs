//! Runs kept in memory between their results (docs/decisions.md, "Runs are kept in memory between their results").

use super::*;

/// A run read without its lock, at a version ([`Store::read_run`]), or as this
/// scheduler last wrote it.
pub struct Snapshot {
    pub(super) state: RunState,
    pub(super) version: i64,
    /// The facts' epoch when the gates' facts were read with the run; `None`: not read.
    pub(super) epoch: Option<i64>,
    /// Kept from this scheduler's own last write, not read now.
    pub(super) cached: bool,
}

/// Why an optimistic transition wrote nothing ([`Store::persist_guarded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unwritten {
    /// The run is no longer at the version (or audit head) it was computed
    /// from, or the write's outcome is unknown.
    Moved,
    /// The transition needs more than one statement; the snapshot may be current.
    NeedsLock,
}

/// Runs as this scheduler last wrote them, so that their next results need no
/// read ([`Store::apply_results`]). Bounded: when full, it starts over.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) runs: std::sync::Mutex<std::collections::HashMap<Uuid, Kept>>,
}

pub(super) enum Kept {
    Run(Box<Snapshot>),
    /// A kept copy of this run was found stale: another replica applies its
    /// results too, so keeping it would mostly waste writes.
    Shared,
}

/// Counts where the run a transition was computed from came from: kept in
/// memory, read, or kept but found stale by the write.
pub(super) fn count_snapshot(source: &str) {
    baton_shared::metrics::global().inc(
        "baton_scheduler_run_snapshots_total",
        "Runs that result transitions were computed from, by source (kept: this replica's own last write; read; stale: kept but changed since, read again)",
        &[("source", source)],
        1.0,
    );
}

/// The most runs [`Cache`] keeps.
pub(super) const CACHED_RUNS: usize = 10_000;

impl Cache {
    pub(super) fn take(&self, run: Uuid) -> Option<Snapshot> {
        let mut runs = self.runs.lock().expect("lock");
        match runs.remove(&run)? {
            Kept::Run(s) => Some(*s),
            Kept::Shared => {
                runs.insert(run, Kept::Shared);
                None
            }
        }
    }

    /// Keeps `snapshot`, unless its run is shared with another replica.
    pub(super) fn put(&self, snapshot: Snapshot) {
        let mut runs = self.runs.lock().expect("lock");
        if runs.len() >= CACHED_RUNS {
            runs.clear();
        }
        if !matches!(runs.get(&snapshot.state.id), Some(Kept::Shared)) {
            runs.insert(snapshot.state.id, Kept::Run(Box::new(snapshot)));
        }
    }

    pub(super) fn shared(&self, run: Uuid) {
        let mut runs = self.runs.lock().expect("lock");
        if runs.len() >= CACHED_RUNS {
            runs.clear();
        }
        runs.insert(run, Kept::Shared);
    }

    /// Drops the kept copy of a run changed under its lock (all of it if the
    /// run ended).
    pub(super) fn changed(&self, run: Uuid, ended: bool) {
        let mut runs = self.runs.lock().expect("lock");
        if ended || matches!(runs.get(&run), Some(Kept::Run(_))) {
            runs.remove(&run);
        }
    }
}
