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

# The queue benchmarks recorded in BENCHMARKS.md.
bench:
    cargo run --release -p stagedoor -- load issue-token
    cargo run --release -p stagedoor -- load queue-status

# What CI runs.
ci:
    bash .ci/run
