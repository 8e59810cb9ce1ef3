-- no-transaction
-- A payment buys one hold: ConfirmHold refuses a payment_id that already bought another hold
-- (store.rs, `confirm_batch`), which it looks up through this index. Built CONCURRENTLY
-- (outside a transaction, hence the line above): a plain build would block every hold and
-- confirm of a live table while it ran. The previous version runs beside it unchanged
-- (README, "Upgrading").
CREATE INDEX CONCURRENTLY IF NOT EXISTS holds_by_payment
    ON holds (payment_id) WHERE payment_id IS NOT NULL;
