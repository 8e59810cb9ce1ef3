-- The waiting room. Runs inside schema `queue` (the pool's search_path).

-- One row per concert's line. Every change of who is ACTIVE happens with this row locked
-- (SELECT ... FOR UPDATE), which serialises admission per concert across every replica:
-- that lock is what makes over-admission and double admission impossible.
CREATE TABLE lines (
    concert_id       text PRIMARY KEY,
    -- Place of the newest token issued: places are 1..last_place, with no gap.
    last_place       bigint NOT NULL DEFAULT 0,
    -- Admission pointer: every place up to here was admitted or skipped (its fan gave up).
    -- A WAITING fan's position is place - admitted_through - 1: O(1), no counting of rows.
    admitted_through bigint NOT NULL DEFAULT 0 CHECK (admitted_through <= last_place),
    -- Tokens ACTIVE right now (kept in step with the tokens table under the row lock).
    active_count     integer NOT NULL DEFAULT 0 CHECK (active_count >= 0),
    -- Admissions ever: replicas sample it to estimate the admission rate.
    admitted_total   bigint NOT NULL DEFAULT 0,
    -- Token bucket of the admission rate: admissions allowed right now, refilled at
    -- QUEUE_ADMIT_RATE per second up to one tick's worth.
    rate_allowance   double precision NOT NULL DEFAULT 0,
    rate_updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    create_time      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    token       uuid PRIMARY KEY,
    concert_id  text NOT NULL REFERENCES lines (concert_id),
    user_id     text NOT NULL,
    place       bigint NOT NULL,
    status      text NOT NULL CHECK (status IN ('WAITING', 'ACTIVE', 'DONE', 'EXPIRED')),
    create_time timestamptz NOT NULL DEFAULT now(),
    -- Last poll or watch of a WAITING token, refreshed coarsely (see heartbeat.rs).
    last_seen   timestamptz NOT NULL DEFAULT now(),
    admit_time  timestamptz,
    -- End of the ACTIVE window. An ACTIVE row past it is EXPIRED for every reader at once;
    -- the sweeper only catches the row up.
    expire_time timestamptz,
    end_time    timestamptz,
    CONSTRAINT tokens_place_unique UNIQUE (concert_id, place)
);

-- A fan has at most one live token per concert: IssueToken's idempotency, enforced.
-- user_id leads so that a batch lookup (`user_id = ANY($2)`) is always an index condition:
-- with concert_id first, a planner with no statistics yet (the first rush on a fresh
-- table) scans every live token of the concert and filters, O(line length) per batch.
CREATE UNIQUE INDEX tokens_one_live_per_fan
    ON tokens (user_id, concert_id) WHERE status IN ('WAITING', 'ACTIVE');
-- Admission takes the WAITING tokens in place order from the admission pointer on. It needs
-- an index that matches exactly: without statistics (a fresh table in its first rush) the
-- planner otherwise takes the last_seen index below and sorts the whole line.
CREATE INDEX tokens_waiting_by_place ON tokens (concert_id, place) WHERE status = 'WAITING';
-- Expiry of ACTIVE windows.
CREATE INDEX tokens_active_by_expiry ON tokens (concert_id, expire_time) WHERE status = 'ACTIVE';
-- Expiry of idle WAITING tokens (ghosts).
CREATE INDEX tokens_waiting_by_last_seen ON tokens (concert_id, last_seen) WHERE status = 'WAITING';
