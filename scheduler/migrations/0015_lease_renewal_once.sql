-- A lease is renewed at a scheduler's start (or when it hears again) at most
-- once between two heartbeats of its attempt: `renewed` is set by the renewal
-- and cleared whenever a transition sets the timer (a heartbeat, a start).
-- A replica restarting in a loop then cannot keep a dead daemon's attempt alive.
alter table timers add column renewed boolean not null default false;
