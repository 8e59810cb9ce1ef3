-- The wallet. Runs inside schema `point` (the pool's search_path).

-- One row per user who ever charged. `balance` is a cache of the ledger, written in the same
-- transaction as every ledger row, and the row lock on it is what serialises a user's
-- charges, spends and refunds across every replica.
CREATE TABLE wallets (
    user_id     text PRIMARY KEY,
    balance     bigint NOT NULL CHECK (balance >= 0),
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- The record: append-only, one row per change of a balance.
CREATE TABLE ledger (
    entry_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       text NOT NULL REFERENCES wallets (user_id),
    kind          text NOT NULL CHECK (kind IN ('CHARGE', 'SPEND', 'REFUND')),
    -- Signed change: positive for CHARGE and REFUND, negative for SPEND.
    amount        bigint NOT NULL CHECK (amount <> 0),
    balance_after bigint NOT NULL CHECK (balance_after >= 0),
    request_id    text,
    payment_id    text,
    create_time   timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'CHARGE') = (request_id IS NOT NULL)),
    CHECK ((kind = 'CHARGE') = (payment_id IS NULL)),
    CHECK ((kind = 'SPEND') = (amount < 0))
);

-- Idempotency, enforced by the database: a charge per (user, request_id), a spend and a
-- refund per payment.
CREATE UNIQUE INDEX ledger_charge_once ON ledger (user_id, request_id) WHERE kind = 'CHARGE';
CREATE UNIQUE INDEX ledger_spend_once ON ledger (payment_id) WHERE kind = 'SPEND';
CREATE UNIQUE INDEX ledger_refund_once ON ledger (payment_id) WHERE kind = 'REFUND';
-- History, newest first.
CREATE INDEX ledger_history ON ledger (user_id, entry_id DESC);

-- Append-only means append-only, even for the service's own role.
CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
