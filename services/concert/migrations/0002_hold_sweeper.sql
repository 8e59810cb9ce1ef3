-- The hold sweeper (`retire_expired_holds` in services/concert/src/store.rs) retires holds that were never paid,
-- some time after their expiry: the hold becomes EXPIRED in its row and its seats lose the
-- hold's mark. Readers never needed it (a HELD hold past expire_time is EXPIRED and its seats
-- AVAILABLE by the clock alone); it keeps `holds` and `seats` telling the truth to anyone
-- who reads the rows, and keeps the live-holds index small.
ALTER TABLE holds DROP CONSTRAINT holds_status_check;
ALTER TABLE holds ADD CONSTRAINT holds_status_check
    CHECK (status IN ('HELD', 'CONFIRMED', 'RELEASED', 'EXPIRED'));

-- The sweeper's search: unpaid holds by expiry.
CREATE INDEX holds_held_by_expiry ON holds (expire_time) WHERE status = 'HELD';
