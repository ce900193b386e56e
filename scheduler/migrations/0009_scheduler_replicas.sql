-- Scheduler replicas alive now, for result affinity: each replica writes its row
-- every second, and the replicas seen recently, in id order, share the result
-- shards between them (shard k to the replica at position k mod n). A replica
-- consumes its own shards with a high consumer priority and the others with a
-- low one, so a run's results reach one replica while membership holds, and any
-- replica while it changes. Nothing here is needed for correctness: every
-- transition is still guarded by the run's version.
create table scheduler_replicas (
    id uuid primary key,
    instance text not null,
    seen_at timestamptz not null default now()
);
