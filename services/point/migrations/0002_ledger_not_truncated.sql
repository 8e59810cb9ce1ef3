-- The append-only trigger of 0001 fires per row, for UPDATE and DELETE; TRUNCATE removes rows
-- without either, so it was still open to the service's own role (and, through CASCADE, to a
-- TRUNCATE of wallets). A ledger emptied beside its wallets breaks balance == ledger sum.
CREATE TRIGGER ledger_never_truncated BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();
