-- A spend is decided once per payment: spent or refused. The payment saga takes a refusal as
-- final (it fails the payment and never spends for it again), so the wallet must too: an
-- earlier attempt of the same SpendPoints that reaches Postgres late (its caller's deadline
-- passed while it was on the way, or a stale saga driver's call was held up in the network)
-- must not spend after a retry was refused and the payment failed, points nobody would
-- ever give back.
--
-- Both outcomes share this primary key, so whichever commits first decides. A SPEND entry
-- inserts its outcome through the trigger below, in the same statement, and is undone whole
-- when a refusal is already recorded (or is being recorded: the unique index makes it wait
-- for that transaction, then fail). A refusal recorded after a spend inserts nothing.
CREATE TABLE spend_outcomes (
    payment_id  text PRIMARY KEY,
    user_id     text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    refused     boolean NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- A trigger rather than the spend statement itself, so that a replica of the previous
-- version, still running during a rolling upgrade, records its spends too: without it, a
-- new replica would find a SPEND without an outcome, and an old one would spend after a
-- refusal. (The old replica answers a refused late attempt INSUFFICIENT_BALANCE, as the new
-- one does: it reads the unique violation as "done before", finds no SPEND, and refuses,
-- with the balance as it is then.) Old replicas record no refusals of their own, and one
-- that restarts after this migration does not start: sqlx refuses a database with a
-- migration the binary does not know.
-- Its search_path is the migration's (the service's schema), whoever inserts the entry.
CREATE FUNCTION spend_decided() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO spend_outcomes (payment_id, user_id, amount, refused)
    VALUES (NEW.payment_id, NEW.user_id, -NEW.amount, false);
    RETURN NULL;
END $$;
-- Created before the backfill, in this migration's transaction: CREATE TRIGGER locks the
-- ledger against inserts until the commit, so no spend can land between the backfill's
-- snapshot and the trigger. Every change of a wallet waits for the backfill meanwhile: one
-- pass over the ledger's SPEND entries.
CREATE TRIGGER spend_decided AFTER INSERT ON ledger
    FOR EACH ROW WHEN (NEW.kind = 'SPEND') EXECUTE FUNCTION spend_decided();

-- Spends made before this table existed are decided too.
INSERT INTO spend_outcomes (payment_id, user_id, amount, refused, create_time)
SELECT payment_id, user_id, -amount, false, create_time FROM ledger WHERE kind = 'SPEND';
