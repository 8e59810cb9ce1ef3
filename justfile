# Everyday recipes; each runs the same command the README gives.

# Provision the local database and run the services until Ctrl-C.
up:
    cargo run --release -p stagedoor -- up

# Every test, against the local Postgres.
test:
    cargo nextest run --workspace

# Contracts and code style, as CI checks them.
lint:
    buf lint
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The benchmarks recorded in BENCHMARKS.md (their default forms).
bench:
    cargo run --release -p stagedoor -- load issue-token
    cargo run --release -p stagedoor -- load queue-status
    cargo run --release -p stagedoor -- load charge
    cargo run --release -p stagedoor -- load charge --users 1 --calls 20000
    cargo run --release -p stagedoor -- load spend
    cargo run --release -p stagedoor -- load spend --users 1 --calls 20000
    cargo run --release -p stagedoor -- load hold-spread
    cargo run --release -p stagedoor -- load hold-race
    cargo run --release -p stagedoor -- load list-seats
    cargo run --release -p stagedoor -- load validate-token

# What CI runs.
ci:
    bash .ci/run
