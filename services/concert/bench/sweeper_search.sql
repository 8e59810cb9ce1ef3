-- Run: psql -h 127.0.0.1 -U postgres -q -f services/concert/bench/sweeper_search.sql
-- (creates and drops the database sweep_probe; its table has the columns and indexes of concert.holds).
-- The concert sweeper's search over a holds table of 1,000,000 sold holds, first with no
-- backlog (the steady state: the sweeper runs every 30 s and finds nothing), then with
-- 100,000 unpaid holds expired more than the grace ago.
DROP DATABASE IF EXISTS sweep_probe;
CREATE DATABASE sweep_probe;
\c sweep_probe
CREATE TABLE holds (
    hold_id uuid PRIMARY KEY, schedule_id text NOT NULL, concert_id text NOT NULL,
    user_id text NOT NULL, seat_numbers integer[] NOT NULL, total_price bigint NOT NULL,
    status text NOT NULL, expire_time timestamptz NOT NULL, payment_id text,
    request_id text NOT NULL, create_time timestamptz NOT NULL DEFAULT now());
CREATE INDEX holds_by_fan ON holds (user_id, schedule_id) WHERE status = 'HELD';
CREATE INDEX holds_held_by_expiry ON holds (expire_time) WHERE status = 'HELD';
INSERT INTO holds SELECT gen_random_uuid(), 's', 'c', 'u' || i, '{1}', 1, 'CONFIRMED',
       now() - interval '1 hour', 'p' || i, 'r' || i FROM generate_series(1, 1000000) i;
INSERT INTO holds SELECT gen_random_uuid(), 's', 'c', 'w' || i, '{1}', 1, 'HELD',
       now() + interval '5 min', null, 'r' || i FROM generate_series(1, 2000) i;
VACUUM ANALYZE holds;
\echo no backlog, ORDER BY hold_id
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => 600) ORDER BY hold_id LIMIT 500 FOR UPDATE SKIP LOCKED;
\echo no backlog, ORDER BY expire_time
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => 600) ORDER BY expire_time LIMIT 500 FOR UPDATE SKIP LOCKED;
INSERT INTO holds SELECT gen_random_uuid(), 's', 'c', 'v' || i, '{1}', 1, 'HELD',
       now() - interval '1 hour' + i * interval '10 ms', null, 'r' || i FROM generate_series(1, 100000) i;
VACUUM ANALYZE holds;
\echo backlog of 100000, ORDER BY hold_id
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => 600) ORDER BY hold_id LIMIT 500 FOR UPDATE SKIP LOCKED;
\echo backlog of 100000, ORDER BY expire_time
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => 600) ORDER BY expire_time LIMIT 500 FOR UPDATE SKIP LOCKED;
SET plan_cache_mode = force_generic_plan;
PREPARE by_id(float8, int8) AS SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => $1) ORDER BY hold_id LIMIT $2 FOR UPDATE SKIP LOCKED;
PREPARE by_expiry(float8, int8) AS SELECT hold_id FROM holds WHERE status = 'HELD' AND expire_time <= now() - make_interval(secs => $1) ORDER BY expire_time LIMIT $2 FOR UPDATE SKIP LOCKED;
\echo generic plan, backlog of 100000, ORDER BY hold_id
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) EXECUTE by_id(600, 500);
\echo generic plan, backlog of 100000, ORDER BY expire_time
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) EXECUTE by_expiry(600, 500);
DELETE FROM holds WHERE status = 'HELD' AND expire_time < now();
VACUUM ANALYZE holds;
\echo generic plan, no backlog, ORDER BY hold_id
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) EXECUTE by_id(600, 500);
\echo generic plan, no backlog, ORDER BY expire_time
EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) EXECUTE by_expiry(600, 500);
\c postgres
DROP DATABASE sweep_probe;
