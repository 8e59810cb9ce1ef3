//! Finding a Postgres for `up` and `demo`: `DATABASE_URL` if given; else the local server on
//! 127.0.0.1:5432 if it answers; else, when this machine has the Postgres binaries, a
//! throwaway cluster under `target/` that is stopped and removed on exit; else a message
//! that says how to get one.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// The local server `up` and `demo` try when no `DATABASE_URL` is given.
const LOCAL_ADDR: &str = "127.0.0.1:5432";

/// A Postgres the command can administer, and the cluster it started for it, if any.
pub struct Postgres {
    pub admin_url: String,
    cluster: Option<Cluster>,
}

impl Postgres {
    /// Where it came from, for people.
    pub fn describe(&self) -> String {
        match &self.cluster {
            Some(cluster) => format!(
                "throwaway cluster in {} (removed on exit)",
                cluster.dir.display()
            ),
            None => stagedoor_runtime::db::redact(&self.admin_url),
        }
    }
}

impl Drop for Postgres {
    /// Stops and removes the throwaway cluster, if this run started one, however the run
    /// ends (success, error or panic).
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.remove();
        }
    }
}

/// Picks the Postgres to use (see the module docs).
pub fn locate(database_url: Option<&str>) -> Result<Postgres, String> {
    if let Some(url) = database_url {
        return Ok(Postgres {
            admin_url: url.to_owned(),
            cluster: None,
        });
    }
    // Where to look for a local server: 127.0.0.1:5432 unless STAGEDOOR_LOCAL_POSTGRES
    // names another address (tests point it at a closed port to take the throwaway path).
    let local = std::env::var("STAGEDOOR_LOCAL_POSTGRES").unwrap_or_else(|_| LOCAL_ADDR.to_owned());
    let local: SocketAddr = local
        .parse()
        .map_err(|_| {
            format!("STAGEDOOR_LOCAL_POSTGRES `{local}` is not an IP address and port, such as 127.0.0.1:5432")
        })?;
    if TcpStream::connect_timeout(&local, Duration::from_secs(1)).is_ok() {
        return Ok(Postgres {
            admin_url: format!(
                "postgres://postgres@{local}/postgres{}",
                loopback_tls(local)
            ),
            cluster: None,
        });
    }
    let Some(bin) = postgres_binaries() else {
        return Err(format!(
            "no PostgreSQL: nothing answers on {local}, DATABASE_URL is not set, and no \
             initdb/pg_ctl were found to start a throwaway one.\n  Start one (e.g. \
             `pg_ctlcluster 15 main start`, or `docker run -d -p 5432:5432 -e \
             POSTGRES_HOST_AUTH_METHOD=trust postgres:15`) or set DATABASE_URL to a superuser \
             URL of yours."
        ));
    };
    let cluster = Cluster::start(&bin)?;
    Ok(Postgres {
        // Its own cluster has no certificate: say so rather than ask for TLS every connect.
        admin_url: format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=disable",
            cluster.superuser_password, cluster.port
        ),
        cluster: Some(cluster),
    })
}

/// The TLS parameter of the URL of a server this command found by itself at `addr`. On the
/// loopback interface, clear text: TLS there protects nothing, yet with sqlx's default
/// (`sslmode=prefer`, TLS whenever the server offers it, as Debian's does) the services'
/// queries paid for it in CPU, and a rush is CPU-bound (BENCHMARKS.md, "Postgres over TLS").
/// The service URLs inherit it (`db::service_url` keeps `ssl*` parameters). Anywhere else,
/// the default stands.
fn loopback_tls(addr: SocketAddr) -> &'static str {
    if addr.ip().is_loopback() {
        "?sslmode=disable"
    } else {
        ""
    }
}

/// The directory holding `initdb` and `pg_ctl`: on PATH, or Debian's versioned directory.
fn postgres_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|dir| dir.path().join("bin")).collect())
        .unwrap_or_default();
    versioned.sort();
    versioned.reverse(); // newest version first
    on_path
        .into_iter()
        .chain(versioned)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

/// A cluster of our own: initdb'd into a fresh directory, serving on a free loopback port.
/// It asks for passwords (SCRAM), the superuser's a random one this run alone knows: a
/// loopback port is open to every user of the machine, and the run exercises the same path
/// as a production cluster (each service's role logs in with its own password).
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    superuser_password: String,
    /// Postgres refuses to run as root: as root, the cluster runs as user `postgres`.
    run_as: Option<&'static str>,
}

impl Cluster {
    fn start(bin: &Path) -> Result<Self, String> {
        let base = if Path::new("target").is_dir() {
            PathBuf::from("target")
        } else {
            std::env::temp_dir()
        };
        let dir = std::fs::canonicalize(&base)
            .map_err(|error| format!("{}: {error}", base.display()))?
            .join(format!("stagedoor-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("no free port: {error}"))?
            .port();
        let run_as = is_root().then_some("postgres");
        let cluster = Self {
            dir,
            bin: bin.to_owned(),
            port,
            superuser_password: uuid::Uuid::new_v4().simple().to_string(),
            run_as,
        };
        if let Some(user) = run_as {
            let chowned = Command::new("chown")
                .args([&format!("{user}:"), &cluster.dir.display().to_string()])
                .status();
            if !chowned.is_ok_and(|status| status.success()) {
                cluster.remove();
                return Err(format!(
                    "running as root, but cannot hand {} to user `{user}` for Postgres",
                    base.display()
                ));
            }
        }
        eprintln!(
            "stagedoor: no Postgres on 127.0.0.1:5432; starting a throwaway one in {} (port {port})",
            cluster.dir.display()
        );
        // initdb reads the superuser's password from a file, readable by the cluster's user
        // alone; it goes once the cluster exists.
        let password_file = cluster.dir.join("superuser-password");
        if let Err(error) = cluster.write_private(&password_file, &cluster.superuser_password) {
            cluster.remove();
            return Err(error);
        }
        let password_file_arg = format!("--pwfile={}", password_file.display());
        let data = cluster.dir.join("data").display().to_string();
        let log = cluster.dir.join("postgres.log").display().to_string();
        // TCP only: no Unix socket, whose path (this directory's, under a checkout's
        // target/) could pass the 107 bytes a socket's path may have, and which nothing here
        // uses (every client connects to 127.0.0.1:port).
        let server_options = format!(
            "-p {port} -k '' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        );
        let steps: [(&str, Vec<&str>); 2] = [
            (
                "initdb",
                vec![
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    &password_file_arg,
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            ),
            (
                "pg_ctl",
                vec![
                    "-D",
                    &data,
                    "-l",
                    &log,
                    "-w",
                    "-o",
                    &server_options,
                    "start",
                ],
            ),
        ];
        for (tool, args) in steps {
            let ran = cluster.run(tool, &args);
            let _ = std::fs::remove_file(&password_file);
            if let Err(error) = ran {
                cluster.remove();
                return Err(error);
            }
        }
        Ok(cluster)
    }

    /// Writes `text` to a new file that only the cluster's user may read (mode 0600, handed
    /// to `postgres` when we are root).
    fn write_private(&self, path: &Path, text: &str) -> Result<(), String> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let failed = |error: std::io::Error| format!("{}: {error}", path.display());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(failed)?;
        if let Some(user) = self.run_as {
            let chowned = Command::new("chown")
                .args([&format!("{user}:"), &path.display().to_string()])
                .status();
            if !chowned.is_ok_and(|status| status.success()) {
                return Err(format!("cannot hand {} to user `{user}`", path.display()));
            }
        }
        Ok(())
    }

    /// Runs a Postgres tool (as `postgres` when we are root), quietly unless it fails.
    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run {}: {error}", program.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Stops the server (fast: connections are closed) and deletes the directory.
    fn remove(self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let data = data.display().to_string();
            if let Err(error) = self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]) {
                eprintln!("stagedoor: stopping the throwaway Postgres: {error}");
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("stagedoor: removing {}: {error}", self.dir.display());
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_found_on_loopback_is_used_without_tls_and_others_keep_the_default() {
        for loopback in ["127.0.0.1:5432", "127.0.0.2:6543", "[::1]:5432"] {
            assert_eq!(loopback_tls(loopback.parse().unwrap()), "?sslmode=disable");
        }
        assert_eq!(loopback_tls("10.0.0.5:5432".parse().unwrap()), "");
    }
}
