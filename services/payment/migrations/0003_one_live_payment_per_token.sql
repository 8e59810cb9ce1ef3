-- One admission buys one hold. Paying completes the fan's queue token (DONE), so a second
-- Pay with that token after the first one finished is refused by the queue; without this
-- rule, Pays of several holds (one per date) sent at the same moment all found the token
-- still ACTIVE and all charged, and what a fan could buy with one place in line depended
-- on how fast they clicked. Like `payments_one_live_per_hold`, a FAILED payment does not
-- count: the token is still ACTIVE after it and the fan may pay again.
--
-- A database from before this rule may hold live payments that share a token (the very
-- race it closes). They are real sales and stay as they are: all but the oldest of each
-- token are marked `token_exclusive = false` and left out of the index, so the index can
-- be built; every payment from now on is exclusive.
ALTER TABLE payments ADD COLUMN token_exclusive boolean NOT NULL DEFAULT true;
UPDATE payments p
   SET token_exclusive = false
 WHERE p.status <> 'FAILED'
   AND EXISTS (SELECT 1 FROM payments q
                WHERE q.token_sha256 = p.token_sha256
                  AND q.status <> 'FAILED'
                  AND (q.create_time, q.payment_id) < (p.create_time, p.payment_id));
CREATE UNIQUE INDEX payments_one_live_per_token ON payments (token_sha256)
    WHERE status <> 'FAILED' AND token_exclusive;
