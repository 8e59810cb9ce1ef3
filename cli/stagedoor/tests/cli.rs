//! The `stagedoor` command as people run it: the real binary, against the local Postgres
//! (`ADMIN_DATABASE_URL`, default postgres://postgres@127.0.0.1:5432/postgres).

use std::process::Command;

use stagedoor_runtime::db::free_connections;

fn admin_url() -> String {
    std::env::var("ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| stagedoor_testkit::DEFAULT_ADMIN_URL.to_owned())
}

fn stagedoor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stagedoor"))
}

/// Runs `command` against the local Postgres and returns what it printed, failing the test
/// (with both outputs) unless it exits 0.
fn succeeds(command: &mut Command, what: &str) -> String {
    let output = command
        .env("DATABASE_URL", admin_url())
        .output()
        .expect("stagedoor runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A pool of one connection to the local Postgres as its superuser.
async fn admin_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url())
        .await
        .unwrap()
}

/// How many demo databases the server holds (demo tests run alone, so a change is theirs).
async fn demo_databases(admin: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'stagedoor_demo_%'")
        .fetch_one(admin)
        .await
        .unwrap()
}

#[test]
fn a_small_demo_sells_out_and_passes_its_verdict() {
    let json = std::env::temp_dir().join(format!("stagedoor-demo-{}.json", std::process::id()));
    // Fewer ACTIVE places than fans: most fans wait in line and watch it move.
    let stdout = succeeds(
        stagedoor()
            .args(["demo", "--fans", "300", "--seats", "50", "--cap", "60"])
            .args(["--rate", "500", "--seed", "7", "--json"])
            .arg(&json),
        "demo",
    );
    assert!(stdout.contains("VERDICT: PASS"), "{stdout}");
    let summary = std::fs::read_to_string(&json).expect("the JSON summary");
    let _ = std::fs::remove_file(&json);
    assert!(summary.starts_with("{\"verdict\":\"PASS\""), "{summary}");
    assert!(
        summary.contains("\"seats_sold\":50,"),
        "sold out: {summary}"
    );
    assert!(summary.contains("\"checks\":[{"), "{summary}");
    assert!(!summary.contains("\"passed\":false"), "{summary}");
}

/// A verdict of PASS says the sale ran its course. One admission a second into one ACTIVE
/// place cannot sell 50 seats in 2 s: the timeout ends the sale, and the verdict must say
/// FAIL (exit 1) though no invariant broke, rather than pass a sale that sold almost nothing.
#[test]
fn a_demo_cut_short_by_its_timeout_fails_its_verdict() {
    let output = stagedoor()
        .args(["demo", "--fans", "100", "--seats", "50", "--cap", "1"])
        .args(["--rate", "1", "--seed", "7", "--timeout", "2s"])
        .env("DATABASE_URL", admin_url())
        .env("RUST_LOG", "info")
        .output()
        .expect("stagedoor runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    // The services' logs, written to a pipe: plain text, no terminal colours.
    assert!(stdout.contains(" INFO "), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "escape codes in piped logs: {stdout}"
    );
    assert!(
        stdout.contains("[FAIL] the sale ended by itself"),
        "{stdout}"
    );
    assert!(stdout.contains("VERDICT: FAIL"), "{stdout}");
}

/// The benchmark harness runs its scenarios to the end: every call answered, none failed.
/// (Its figures are for BENCHMARKS.md, not for here: this is a debug build on a busy CI.)
#[test]
fn load_scenarios_make_every_call_and_report_it() {
    for (scenario, count_flag, line) in [
        ("health", "--calls", "health"),
        ("issue-token", "--fans", "issue-token"),
    ] {
        let stdout = succeeds(
            stagedoor()
                .args(["load", scenario, count_flag, "300", "--concurrency", "300"])
                .args(["--connections", "3"]),
            &format!("load {scenario}"),
        );
        let figures: Vec<&str> = stdout
            .lines()
            .find(|printed| printed.starts_with(line))
            .unwrap_or_else(|| panic!("no `{line}` line: {stdout}"))
            .split_whitespace()
            .collect();
        assert_eq!(
            figures.get(1..5),
            Some(&["300", "ok", "0", "err"][..]),
            "{stdout}"
        );
    }
}

#[test]
fn a_demo_that_cannot_run_says_why_and_exits_2() {
    let output = stagedoor()
        .args(["demo", "--fans", "10", "--seats", "5"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/postgres")
        .output()
        .expect("stagedoor runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stagedoor"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// On a Postgres whose connections are nearly all taken, the demo says so and how to fix
/// it, instead of starting pools that would time out mid-sale; and it leaves no database.
/// (Runs alone, as every demo test does: see .config/nextest.toml.)
#[tokio::test]
async fn a_demo_on_a_crowded_postgres_says_why_and_leaves_nothing() {
    use sqlx::Connection;
    let admin = admin_pool().await;
    let before = demo_databases(&admin).await;
    // Take connections (as the superuser, who may also use the reserved ones) until fewer
    // than 12 are left for the services' roles: below the 20 the mesh needs, with room for
    // a few connections of others to close meanwhile.
    let (_, max_connections) = free_connections(&admin_url()).await.unwrap();
    let mut taken = Vec::new();
    while free_connections(&admin_url()).await.unwrap().0 >= 12 {
        assert!(
            (taken.len() as i64) < max_connections,
            "the server never ran short of connections"
        );
        taken.push(sqlx::PgConnection::connect(&admin_url()).await.unwrap());
    }
    let output = tokio::task::spawn_blocking(|| {
        stagedoor()
            .args(["demo", "--fans", "10", "--seats", "5"])
            .env("DATABASE_URL", admin_url())
            .output()
            .expect("stagedoor runs")
    })
    .await
    .unwrap();
    for connection in taken {
        connection.close().await.unwrap();
    }
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_connections"), "{stderr}");
    let after = demo_databases(&admin).await;
    assert_eq!(after, before, "the demo's database was dropped");
    admin.close().await;
}

/// `--help` shows where each setting comes from, and clap would print the environment's
/// value of each: the database URL's password included.
#[test]
fn help_never_prints_the_database_password() {
    for command in [&["up"][..], &["demo"], &["load", "issue-token"]] {
        let output = stagedoor()
            .args(command)
            .arg("--help")
            .env(
                "DATABASE_URL",
                "postgres://postgres:s3cret@127.0.0.1:5432/postgres",
            )
            .output()
            .expect("stagedoor runs");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && help.contains("DATABASE_URL"),
            "{help}"
        );
        assert!(
            !help.contains("s3cret"),
            "`{command:?} --help` printed it:\n{help}"
        );
    }
}

#[tokio::test]
async fn health_exits_zero_for_a_serving_service_and_non_zero_otherwise() {
    let database = stagedoor_testkit::TestDatabase::create().await;
    let config =
        stagedoor_queue::QueueConfig::for_database(database.url(stagedoor_runtime::db::QUEUE));
    let (queue, _) =
        stagedoor_testkit::serve(|listener| stagedoor_queue::start(config, listener)).await;
    let url = queue.url();
    let serving = tokio::task::spawn_blocking(move || stagedoor().args(["health", &url]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(serving.status.success(), "{serving:?}");
    queue.shutdown().await.unwrap();
    let nobody =
        tokio::task::spawn_blocking(|| stagedoor().args(["health", "http://127.0.0.1:1"]).output())
            .await
            .unwrap()
            .unwrap();
    assert!(!nobody.status.success());
    // The probe of docker-compose's health checks: an operator reads why it failed.
    let said = String::from_utf8_lossy(&nobody.stderr);
    assert!(said.contains("refused"), "the cause is named: {said}");
    let no_scheme =
        tokio::task::spawn_blocking(|| stagedoor().args(["health", "127.0.0.1:1"]).output())
            .await
            .unwrap()
            .unwrap();
    assert!(!no_scheme.status.success());
    assert!(
        String::from_utf8_lossy(&no_scheme.stderr).contains("http://"),
        "{no_scheme:?}"
    );
}

/// Starts `demo`, sends it SIGINT once its sale is about to open (its `concert` line), and
/// returns its exit code and everything it printed.
fn interrupted_demo(command: &mut Command) -> (Option<i32>, String) {
    interrupted(
        command.args(["demo", "--fans", "3000", "--seats", "500", "--seed", "3"]),
        "concert ",
    )
}

/// Runs `command`, sends it SIGINT once it prints a line starting with `at` (leading
/// spaces aside) on stdout, and returns its exit code and everything it printed.
fn interrupted(command: &mut Command, at: &str) -> (Option<i32>, String) {
    interrupted_on(command, at, false)
}

/// [`interrupted`], watching stderr for `at` instead when `on_stderr`.
fn interrupted_on(command: &mut Command, at: &str, on_stderr: bool) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("stagedoor runs");
    let watched: Box<dyn Read> = if on_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let mut printed = String::new();
    let mut lines = BufReader::new(watched).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.trim_start().starts_with(at) {
            let interrupted = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(interrupted.success());
            break;
        }
    }
    for line in lines {
        printed.push_str(&line.unwrap());
        printed.push('\n');
    }
    let output = child.wait_with_output().unwrap();
    printed.push_str(&String::from_utf8_lossy(&output.stdout));
    printed.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code(), printed)
}

/// Ctrl-C mid-sale ends the sale as --timeout would, and the demo still cleans up: without
/// a handler the process died on the spot and left its database behind.
#[tokio::test]
async fn a_demo_stopped_by_ctrl_c_drops_its_database() {
    let admin = admin_pool().await;
    let before = demo_databases(&admin).await;
    let (code, printed) = tokio::task::spawn_blocking(|| {
        interrupted_demo(stagedoor().env("DATABASE_URL", admin_url()))
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.contains("cut short by a stop signal"), "{printed}");
    assert!(printed.contains("VERDICT: FAIL"), "{printed}");
    let after = demo_databases(&admin).await;
    assert_eq!(after, before, "the demo's database was left behind");
    admin.close().await;
}

/// A load run stopped by Ctrl-C stops its services and drops its database too.
#[tokio::test]
async fn a_load_run_stopped_by_ctrl_c_drops_its_database() {
    let admin = admin_pool().await;
    let (code, printed) = tokio::task::spawn_blocking(|| {
        interrupted(
            stagedoor()
                .args([
                    "load",
                    "issue-token",
                    "--fans",
                    "5000000",
                    "--connections",
                    "2",
                ])
                .env("DATABASE_URL", admin_url()),
            "stagedoor load:",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.contains("stopped by a signal"), "{printed}");
    // This run's database by name: other tests' runs come and go meanwhile.
    let database = printed
        .split("throwaway database `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no database named: {printed}"));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the run's database {database} was left behind");
    admin.close().await;
}

/// The same on a throwaway cluster, which `pg_ctl` starts in a session of its own: the
/// terminal's Ctrl-C never reaches it, and only the demo can stop it.
#[test]
fn a_demo_stopped_by_ctrl_c_removes_its_throwaway_cluster() {
    if !has_postgres_binaries() {
        return; // the test above covers the database; there is no cluster to start here
    }
    let machine = NoLocalPostgres::new("stagedoor-int");
    let (code, printed) = interrupted_demo(&mut machine.stagedoor());
    let leftovers = machine.leftovers();
    assert!(printed.contains("throwaway cluster"), "{printed}");
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        leftovers.is_empty(),
        "left behind: {leftovers:?}\n{printed}"
    );
}

/// A stop signal while the demo starts (here while its throwaway cluster is made) does not
/// cut the start-up short, which would leave what it made half done: the demo stops right
/// after it, before the sale, and still removes everything.
#[test]
fn a_demo_stopped_during_start_up_stops_before_the_sale_and_removes_its_cluster() {
    if !has_postgres_binaries() {
        return; // the throwaway cluster's start is the start-up this signal must land in
    }
    let machine = NoLocalPostgres::new("stagedoor-early");
    let (code, printed) = interrupted_on(
        machine
            .stagedoor()
            .args(["demo", "--fans", "100", "--seats", "50"]),
        "stagedoor: no Postgres",
        true,
    );
    let leftovers = machine.leftovers();
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.contains("stopping once start-up is done"),
        "{printed}"
    );
    assert!(
        printed.contains("stopped before the sale began"),
        "{printed}"
    );
    assert!(!printed.contains("VERDICT"), "{printed}");
    assert!(
        leftovers.is_empty(),
        "left behind: {leftovers:?}\n{printed}"
    );
}

/// A working directory of the test's own, with an empty `target/` where a throwaway cluster
/// must appear and go, for a `stagedoor` that finds no Postgres on this machine.
struct NoLocalPostgres {
    workdir: std::path::PathBuf,
}

impl NoLocalPostgres {
    /// Under the temporary directory, named `name` and this process's id.
    fn new(name: &str) -> Self {
        let workdir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(workdir.join("target")).unwrap();
        Self { workdir }
    }

    /// `stagedoor` run there, with no DATABASE_URL and nothing listening where it looks for
    /// a local Postgres (port 1).
    fn stagedoor(&self) -> Command {
        let mut command = stagedoor();
        command
            .current_dir(&self.workdir)
            .env_remove("DATABASE_URL")
            .env("STAGEDOOR_LOCAL_POSTGRES", "127.0.0.1:1");
        command
    }

    /// What was left in `target/`; the directory goes.
    fn leftovers(self) -> Vec<std::fs::DirEntry> {
        let left = std::fs::read_dir(self.workdir.join("target"))
            .unwrap()
            .flatten()
            .collect();
        let _ = std::fs::remove_dir_all(&self.workdir);
        left
    }
}

/// Whether this machine can start a Postgres of its own: `initdb` and `pg_ctl` on the PATH
/// or in Debian's versioned directories, where `stagedoor` looks for them. (A machine with
/// only Debian's client package has `/usr/lib/postgresql/NN/bin` without them.)
fn has_postgres_binaries() -> bool {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let versioned: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|dir| dir.path().join("bin")).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(versioned)
        .any(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

#[test]
fn without_a_postgres_the_demo_runs_on_a_throwaway_cluster_and_removes_it() {
    // Deep, as a checkout may be: a Unix socket in there would pass the 107 bytes a socket's
    // path may have, and Postgres would not start.
    let machine = NoLocalPostgres::new(&format!("stagedoor-cli-{}", "deep".repeat(24)));
    let output = machine
        .stagedoor()
        .args([
            "demo", "--fans", "60", "--seats", "10", "--cap", "20", "--seed", "5",
        ])
        .output()
        .expect("stagedoor runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let leftovers = machine.leftovers();
    if has_postgres_binaries() {
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("throwaway cluster"), "{stdout}");
        assert!(stdout.contains("VERDICT: PASS"), "{stdout}");
    } else {
        // No binaries to start one: a clear message saying how to get a Postgres.
        assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
        assert!(stderr.contains("no PostgreSQL"), "{stderr}");
    }
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
