//! Result affinity: which scheduler replica prefers which result shard.
//!
//! Daemons publish a run's results to one of [`RESULT_SHARDS`] queues, chosen
//! by the run id. Every replica consumes every shard, so a result is applied
//! whoever is alive; but each replica consumes the shards it owns with a high
//! consumer priority and the others with a low one, and the broker hands a
//! message to the highest-priority consumer with room. A run's `started` and
//! outcome then reach the same replica, which applies them together and keeps
//! the run in memory between its results (`store.rs`), instead of two replicas
//! racing on the same run.
//!
//! Ownership follows membership: replicas write a heartbeat row every
//! [`BEAT`], and those seen within [`LIVE_FOR`], in id order, share the
//! shards (shard `k` to the replica at position `k mod n`). While membership
//! changes, two replicas may both own a shard, or none; the broker then spreads
//! its results, as it would without affinity. Correctness never depends on it:
//! every transition is guarded by the run's version.

use std::time::Duration;

use baton_shared::topology::RESULT_SHARDS;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{REPLICAS_CHANNEL, Store};

/// Consumer priority of a shard this replica owns.
pub const OWN: i32 = 10;
/// Consumer priority of the other shards and of the unsharded results queue.
pub const OTHER: i32 = 0;
/// How often a replica writes its heartbeat.
pub const BEAT: Duration = Duration::from_secs(1);
/// A replica not heard from for this long no longer owns shards.
pub const LIVE_FOR: Duration = Duration::from_secs(5);

/// The consumer priority of each result shard, as this replica sees it.
pub struct Affinity {
    me: Uuid,
    shards: Vec<watch::Sender<i32>>,
}

impl Affinity {
    /// A replica that owns nothing yet: until its first heartbeat, every shard
    /// has the low priority.
    pub fn new(me: Uuid) -> Self {
        Self {
            me,
            shards: (0..RESULT_SHARDS).map(|_| watch::channel(OTHER).0).collect(),
        }
    }

    /// This replica's id in `scheduler_replicas`.
    pub fn id(&self) -> Uuid {
        self.me
    }

    /// Follows the priority of `shard`'s consumer.
    pub fn priority(&self, shard: u32) -> watch::Receiver<i32> {
        self.shards[shard as usize].subscribe()
    }

    /// Applies membership `live` (in id order); returns the shards owned now.
    pub fn assign(&self, live: &[Uuid]) -> Vec<u32> {
        let mut owned = Vec::new();
        for (k, tx) in self.shards.iter().enumerate() {
            let own = owner(k as u32, live) == Some(self.me);
            if own {
                owned.push(k as u32);
            }
            tx.send_if_modified(|p| {
                let want = if own { OWN } else { OTHER };
                std::mem::replace(p, want) != want
            });
        }
        owned
    }
}

/// The replica that owns `shard` among `live` (in id order).
pub fn owner(shard: u32, live: &[Uuid]) -> Option<Uuid> {
    (!live.is_empty()).then(|| live[shard as usize % live.len()])
}

/// Writes this replica's heartbeat and follows membership until `stop`; then
/// removes the replica, so the others take its shards at once.
///
/// Besides the beat, a replica that joins or leaves notifies the others
/// (`LISTEN`/`NOTIFY` on a connection of its own, `db_url`), and they look
/// again at once: shards change hands within milliseconds of a start or a clean
/// stop, and within [`LIVE_FOR`] of a crash.
pub async fn membership_loop(
    store: Store,
    affinity: std::sync::Arc<Affinity>,
    db_url: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let me = affinity.id();
    let mut last: Option<Vec<u32>> = None;
    let mut failing = false;
    let mut announced = false;
    let mut listener: Option<PgListener> = None;
    loop {
        if listener.is_none() {
            listener = listen(&db_url).await;
        }
        match store.replica_heartbeat(me, LIVE_FOR).await {
            Ok(live) => {
                failing = false;
                let owned = affinity.assign(&live);
                baton_shared::metrics::global().set(
                    "baton_scheduler_result_shards_owned",
                    "Result shards this scheduler replica consumes with the high priority",
                    &[],
                    owned.len() as f64,
                );
                if last.as_ref() != Some(&owned) {
                    tracing::info!(replica = %me, replicas = live.len(), shards = ?owned, "result shards assigned");
                    last = Some(owned);
                }
                if !announced {
                    announced = store.replicas_changed().await.is_ok();
                }
            }
            // Keep the last assignment: the others keep theirs too, or take
            // this replica's shards once its heartbeat is old.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot write the replica heartbeat; result shards unchanged");
            }
            Err(_) => {}
        }
        let woken = async {
            match listener.as_mut() {
                Some(l) => l.try_recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(BEAT) => {}
            woke = woken => {
                if let Ok(Some(_)) = woke {
                    continue;
                }
                // The listener's connection was lost, or cannot be had: look
                // again at the next beat, with a new listener (never in a loop).
                if let Err(e) = woke {
                    tracing::warn!(error = %e, "replica notifications lost; following membership by the beat until they are back");
                }
                listener = None;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(BEAT) => {}
                }
            }
        }
    }
    if let Err(e) = store.replica_leave(me).await {
        tracing::warn!(error = %e, "cannot remove the replica's heartbeat; the others take its shards when it is old");
    }
    Ok(())
}

/// A connection listening for replicas joining and leaving; `None` if the
/// database cannot be reached now (the beat still works when it can).
async fn listen(db_url: &str) -> Option<PgListener> {
    let connect = async {
        let mut l = PgListener::connect(db_url).await.ok()?;
        l.listen(REPLICAS_CHANNEL).await.ok()?;
        Some(l)
    };
    // Never hold up the beat for long.
    tokio::time::timeout(BEAT, connect).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_has_exactly_one_owner_and_owners_share_evenly() {
        for n in 1..=5usize {
            let mut live: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
            live.sort();
            let replicas: Vec<Affinity> = live.iter().map(|id| Affinity::new(*id)).collect();
            let owned: Vec<Vec<u32>> = replicas.iter().map(|a| a.assign(&live)).collect();
            let mut all: Vec<u32> = owned.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..RESULT_SHARDS).collect::<Vec<_>>(), "{n} replicas");
            let (min, max) = owned
                .iter()
                .fold((usize::MAX, 0), |(lo, hi), o| (lo.min(o.len()), hi.max(o.len())));
            assert!(max - min <= 1, "{n} replicas: {owned:?}");
            for (a, o) in replicas.iter().zip(&owned) {
                for k in 0..RESULT_SHARDS {
                    let want = if o.contains(&k) { OWN } else { OTHER };
                    assert_eq!(*a.priority(k).borrow(), want);
                }
            }
        }
    }

    #[test]
    fn a_replica_that_left_gives_its_shards_to_the_others() {
        let mut live: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        live.sort();
        let a = Affinity::new(live[0]);
        let mut rx = a.priority(1);
        assert_eq!(a.assign(&live).len(), RESULT_SHARDS as usize / 2);
        assert_eq!(*rx.borrow_and_update(), OTHER, "shard 1 is the other replica's");
        assert_eq!(a.assign(&live[..1]).len(), RESULT_SHARDS as usize);
        assert!(rx.has_changed().unwrap(), "the consumer hears of the change");
        assert_eq!(*rx.borrow_and_update(), OWN);
        assert_eq!(owner(3, &[]), None);
    }
}
