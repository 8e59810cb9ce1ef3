-- Catalog, seats and holds. Runs inside schema `concert` (the pool's search_path).

CREATE TABLE concerts (
    concert_id  text PRIMARY KEY,
    title       text NOT NULL,
    artist      text NOT NULL,
    request_id  text NOT NULL UNIQUE,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedules (
    schedule_id text PRIMARY KEY,
    concert_id  text NOT NULL REFERENCES concerts (concert_id),
    start_time  timestamptz NOT NULL,
    venue       text NOT NULL,
    seat_count  integer NOT NULL CHECK (seat_count BETWEEN 1 AND 1000),
    request_id  text NOT NULL UNIQUE,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_by_concert ON schedules (concert_id, start_time);

-- One row per seat. Its state is derived, never swept:
--   SOLD       when sold_to_payment is set;
--   HELD       when held_by is set and held_until is still ahead;
--   AVAILABLE  otherwise, so a hold whose time has passed frees its seats at that instant.
-- held_by is left in place after expiry on purpose: ConfirmHold of an expired hold sells
-- the seats only if held_by still names it (nobody took them since).
CREATE TABLE seats (
    schedule_id      text NOT NULL REFERENCES schedules (schedule_id),
    seat_number      integer NOT NULL CHECK (seat_number >= 1),
    section          text NOT NULL,
    price            bigint NOT NULL CHECK (price > 0),
    held_by          uuid,
    held_until       timestamptz,
    sold_to_payment  text,
    PRIMARY KEY (schedule_id, seat_number),
    CHECK ((held_by IS NULL) = (held_until IS NULL))
);

-- No foreign key to schedules on purpose: its check takes a KEY SHARE lock on the date's
-- row, and a rush of holds on one date then piles hundreds of lockers on that one row
-- (multixacts), which measured ~1,000 holds/s. Holds are only ever made for a date read
-- under the same request, and dates are never deleted.
CREATE TABLE holds (
    hold_id      uuid PRIMARY KEY,
    schedule_id  text NOT NULL,
    concert_id   text NOT NULL,
    user_id      text NOT NULL,
    seat_numbers integer[] NOT NULL CHECK (cardinality(seat_numbers) BETWEEN 1 AND 4),
    total_price  bigint NOT NULL CHECK (total_price > 0),
    -- HELD (until expire_time: past it, readers report EXPIRED), CONFIRMED or RELEASED.
    status       text NOT NULL CHECK (status IN ('HELD', 'CONFIRMED', 'RELEASED')),
    expire_time  timestamptz NOT NULL,
    payment_id   text,
    request_id   text NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT holds_request_once UNIQUE (user_id, request_id),
    CHECK ((status = 'CONFIRMED') = (payment_id IS NOT NULL))
);
-- The per-fan limit counts a fan's live holds of one date.
CREATE INDEX holds_by_fan ON holds (user_id, schedule_id) WHERE status = 'HELD';
