-- A spend is decided once per payment: spent or refused. The payment saga takes a refusal as
-- final (it fails the payment and never spends for it again), so the wallet must too: an
-- earlier attempt of the same SpendPoints that reaches Postgres late (its caller's deadline
-- passed while it was on the way, or a stale saga driver's call was held up in the network)
-- must not spend after a retry was refused and the payment failed, points nobody would
-- ever give back.
--
-- Both outcomes share this primary key, so whichever commits first decides: a spend
-- statement inserts its row here in the same statement as its ledger entry, and is undone
-- whole when a refusal is already recorded (or is being recorded: the unique index makes it
-- wait for that transaction, then fail); a refusal recorded after a spend inserts nothing.
CREATE TABLE spend_outcomes (
    payment_id  text PRIMARY KEY,
    user_id     text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    refused     boolean NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- Spends made before this table existed are decided too.
INSERT INTO spend_outcomes (payment_id, user_id, amount, refused, create_time)
SELECT payment_id, user_id, -amount, false, create_time FROM ledger WHERE kind = 'SPEND';
