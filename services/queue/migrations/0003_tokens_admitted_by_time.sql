-- no-transaction
-- Admission counts the fans it admitted in the last second before admitting more, so that no
-- one-second window ever holds more than the configured rate (store.rs, `admit`). This index
-- makes that count a short range scan of at most one second's admissions of one concert.
-- Built CONCURRENTLY (outside a transaction, hence the line above): on a live `tokens` table a
-- plain CREATE INDEX would block every IssueToken and admission while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tokens_admitted_by_time
    ON tokens (concert_id, admit_time) WHERE admit_time IS NOT NULL;
