-- Room on each page for updated row versions: a run's row and its steps' and
-- attempts' rows are updated several times each, and an update that finds room
-- on its page (and changes no indexed column) is a heap-only tuple update, which
-- writes no index entries.
alter table runs set (fillfactor = 50);
alter table steps set (fillfactor = 60);
alter table attempts set (fillfactor = 70);
