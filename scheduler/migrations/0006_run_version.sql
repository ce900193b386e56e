-- A run's version: every transition that writes bumps it (in the same statement as
-- its writes). A result transition computed from an unlocked read writes only if
-- the version is still the one it read (store.rs, optimistic apply); otherwise it
-- is computed again under the run's row lock.
alter table runs add column version bigint not null default 0;
