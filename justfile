# Everyday recipes; each runs the same command the README gives.

# Arguments reach the commands as given, quotes and all (`"$@"`).
set positional-arguments

# Flags pass through to each of the first three: `just demo --fans 2000 --seed 7`.
# Bring the mesh up on a fresh database and stage a sale, with a verdict (README quick start).
demo *ARGS:
    cargo run --release -p stagedoor -- demo "$@"

# Provision the local database and run the services until Ctrl-C.
up *ARGS:
    cargo run --release -p stagedoor -- up "$@"

# Every test, against the local Postgres (a filter narrows them: `just test -E 'test(/watch/)'`).
test *ARGS:
    cargo nextest run --workspace "$@"

# Contracts, compose file and code style, as CI checks them.
lint:
    buf lint
    bash .ci/compose-check
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
    cargo run --release -p stagedoor -- load health --concurrency 10000 --connections 100
    cargo run --release -p stagedoor -- load pay
    cargo run --release -p stagedoor -- load rush --json target/rush-summary.json

# What CI runs.
ci:
    bash .ci/run
