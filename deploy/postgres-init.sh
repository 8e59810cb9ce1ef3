#!/usr/bin/env bash
# Provisions stagedoor in the official postgres image. The image runs this once, on the first
# start of an empty data directory (docker-compose.yml mounts it into
# /docker-entrypoint-initdb.d); to run it again, drop the volume: `docker compose down -v`.
#
# It creates the database `stagedoor` and, for each service, a login role that OWNS the
# service's schema (the service checks that at start-up and runs its own migrations there).
# Nobody else gets any right on those schemas, so no service can touch another's tables.
# This is what `stagedoor up` does through its admin connection, plus a password per role:
#
#   role               schema    password from
#   stagedoor_queue    queue     QUEUE_DB_PASSWORD
#   stagedoor_concert  concert   CONCERT_DB_PASSWORD
#   stagedoor_point    point     POINT_DB_PASSWORD
#   stagedoor_payment  payment   PAYMENT_DB_PASSWORD
#
# The image executes the file when it is executable and sources it otherwise, so all the work
# happens in a subshell: the strict mode below never leaks into the image's entrypoint.
(
  set -euo pipefail

  : "${QUEUE_DB_PASSWORD:?QUEUE_DB_PASSWORD must be set}"
  : "${CONCERT_DB_PASSWORD:?CONCERT_DB_PASSWORD must be set}"
  : "${POINT_DB_PASSWORD:?POINT_DB_PASSWORD must be set}"
  : "${PAYMENT_DB_PASSWORD:?PAYMENT_DB_PASSWORD must be set}"

  # Passwords travel as psql variables and are quoted by psql (:'name'), never pasted into
  # SQL text, and the session stops the server from logging its statements. The heredoc is
  # quoted ('SQL') so that the shell expands nothing in it.
  psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v queue_pw="$QUEUE_DB_PASSWORD" \
    -v concert_pw="$CONCERT_DB_PASSWORD" \
    -v point_pw="$POINT_DB_PASSWORD" \
    -v payment_pw="$PAYMENT_DB_PASSWORD" \
    <<'SQL'
CREATE DATABASE stagedoor;
\connect stagedoor
-- The statements below carry passwords: keep them out of the server's log whatever it is
-- set to log (statements, slow statements, failed statements), for this session only.
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = panic;

CREATE ROLE stagedoor_queue LOGIN PASSWORD :'queue_pw';
CREATE SCHEMA queue AUTHORIZATION stagedoor_queue;

CREATE ROLE stagedoor_concert LOGIN PASSWORD :'concert_pw';
CREATE SCHEMA concert AUTHORIZATION stagedoor_concert;

CREATE ROLE stagedoor_point LOGIN PASSWORD :'point_pw';
CREATE SCHEMA point AUTHORIZATION stagedoor_point;

CREATE ROLE stagedoor_payment LOGIN PASSWORD :'payment_pw';
CREATE SCHEMA payment AUTHORIZATION stagedoor_payment;
SQL
)
