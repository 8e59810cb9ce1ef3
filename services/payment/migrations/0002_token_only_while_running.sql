-- The fan's queue token is a bearer credential: whoever holds it can act as the fan until
-- it ends. The saga needs the token itself only up to its last step (COMPLETE_TOKEN); a
-- replay after that proves who it is by presenting the same token, which a digest checks as
-- well as the token. So a payment keeps the token while its saga runs and only the token's
-- SHA-256 once it is DONE (completed or failed): a copy of this table hands out no live
-- credential of a finished payment (a FAILED payment's token may still be ACTIVE).
ALTER TABLE payments ADD COLUMN token_sha256 bytea;
UPDATE payments SET token_sha256 = sha256(convert_to(token, 'UTF8'));
ALTER TABLE payments ALTER COLUMN token_sha256 SET NOT NULL;
ALTER TABLE payments ALTER COLUMN token DROP NOT NULL;
UPDATE payments SET token = NULL WHERE step = 'DONE';
ALTER TABLE payments ADD CONSTRAINT payments_token_only_while_running
    CHECK ((token IS NULL) = (step = 'DONE'));
