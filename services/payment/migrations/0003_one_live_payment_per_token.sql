-- One admission buys one hold. Paying completes the fan's queue token (DONE), so a second
-- Pay with that token after the first one finished is refused by the queue; without this
-- rule, Pays of several holds (one per date) sent at the same moment all found the token
-- still ACTIVE and all charged, and what a fan could buy with one place in line depended
-- on how fast they clicked. Like `payments_one_live_per_hold`, a FAILED payment does not
-- count: the token is still ACTIVE after it and the fan may pay again.
CREATE UNIQUE INDEX payments_one_live_per_token ON payments (token_sha256) WHERE status <> 'FAILED';
