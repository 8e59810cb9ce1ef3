-- The payment saga's own record. Runs inside schema `payment` (the pool's search_path).
--
-- One row per payment, written before any other service is asked to do anything, so that
-- whatever happens next (a crash, a peer going away) a recovery pass can find the payment
-- and finish it or undo it. `step` is the next thing the saga has to do; every step is
-- idempotent at the callee, keyed by `payment_id`, so a step whose outcome is unknown is
-- simply done again.
--
--   SPEND ──ok──> CONFIRM ──ok──> COMPLETE_TOKEN ──ok──> DONE (COMPLETED)
--     │              │
--     │ refused      │ refused (seat taken, hold gone)
--     v              v
--   DONE (FAILED)  REFUND ──ok──> DONE (FAILED)
CREATE TABLE payments (
    payment_id      uuid PRIMARY KEY,
    user_id         text NOT NULL,
    -- The client's idempotency key, unique per user.
    request_id      text NOT NULL,
    hold_id         uuid NOT NULL,
    concert_id      text NOT NULL,
    schedule_id     text NOT NULL,
    seat_numbers    integer[] NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    start_time      timestamptz NOT NULL,
    -- The fan's queue token: the last step completes it, possibly long after the call.
    token           text NOT NULL,
    step            text NOT NULL
        CHECK (step IN ('SPEND', 'CONFIRM', 'REFUND', 'COMPLETE_TOKEN', 'DONE')),
    status          text NOT NULL CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED')),
    failure_reason  text NOT NULL DEFAULT '',
    failure_message text NOT NULL DEFAULT '',
    balance_after   bigint NOT NULL DEFAULT 0,
    -- Who drives the saga now and until when. A driver that stops renewing (crashed, or
    -- waiting for a peer) lets the recovery worker of any replica take over after that.
    lease_owner     uuid,
    lease_until     timestamptz,
    -- Failed attempts in a row, for the recovery worker's backoff.
    attempts        integer NOT NULL DEFAULT 0,
    create_time     timestamptz NOT NULL DEFAULT now(),
    complete_time   timestamptz,
    CONSTRAINT payments_request_once UNIQUE (user_id, request_id),
    -- The saga's states and the statuses clients see move together.
    CONSTRAINT payments_step_matches_status CHECK (
        (status = 'PENDING' AND step IN ('SPEND', 'CONFIRM', 'REFUND'))
        OR (status = 'COMPLETED' AND step IN ('COMPLETE_TOKEN', 'DONE'))
        OR (status = 'FAILED' AND step = 'DONE')),
    CONSTRAINT payments_ended_when_not_pending CHECK ((status = 'PENDING') = (complete_time IS NULL)),
    CONSTRAINT payments_unfinished_are_leased CHECK ((step = 'DONE') = (lease_until IS NULL))
);

-- At most one payment of a hold that is not FAILED: of concurrent Pays for one hold with
-- different request ids exactly one gets to charge; after a FAILED one the fan may retry.
CREATE UNIQUE INDEX payments_one_live_per_hold ON payments (hold_id) WHERE status <> 'FAILED';
-- A replay that presents the same token needs no round trip to the queue.
CREATE INDEX payments_by_request ON payments (request_id);
-- ListPayments, newest first.
CREATE INDEX payments_history ON payments (user_id, create_time DESC, payment_id DESC);
-- What the recovery worker looks for: unfinished sagas whose lease has run out.
CREATE INDEX payments_unfinished ON payments (lease_until) WHERE step <> 'DONE';
