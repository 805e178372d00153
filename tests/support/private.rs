//! Database servers of a test's own, started on free ports in a temporary directory so
//! that the test may crash and restart them: PostgreSQL (`initdb`, `pg_ctl`) and MariaDB
//! (`mariadb-install-db`, `mariadbd`). As root, the servers run as the `postgres` and
//! `mysql` users their packages create.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args...`, as `user` when this process is root.
fn command_as(user: &str, program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory the server's user may own: world-traversable parent, owned by `user`.
fn server_dir(user: &str) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::Builder::new()
        .prefix("sluice-server-")
        .tempdir()
        .expect("tmp");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = top.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg(format!("{user}:")).arg(&data);
                c
            },
            "chown the data directory",
        );
    }
    (top, data)
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL server of the test's own.
pub struct PrivatePg {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    _top: tempfile::TempDir,
}

fn pg_bin() -> PathBuf {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let from_config = out.filter(|b| b.join("initdb").exists());
    from_config
        .or_else(|| {
            let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                .ok()?
                .flatten()
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").exists())
                .collect();
            found.sort();
            found.pop()
        })
        .expect("PostgreSQL's initdb must be installed (scripts/services installs it)")
}

impl PrivatePg {
    /// Initialises a cluster (trust authentication, user `postgres`) and starts it.
    pub fn start() -> Self {
        let (top, data) = server_dir("postgres");
        let bin = pg_bin();
        let mut init = command_as("postgres", &bin.join("initdb"));
        init.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(init, "initdb");
        let pg = PrivatePg {
            port: free_port(),
            bin,
            data,
            _top: top,
        };
        pg.start_again();
        pg
    }

    /// The URL of database `db` (`postgres` exists).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again).
    pub fn start_again(&self) {
        let mut start = command_as("postgres", &self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
                self.port,
                self.data.display()
            ))
            .args(["-w", "-t", "60", "start"]);
        run(start, "pg_ctl start");
        wait_for_port(self.port, "PostgreSQL");
    }

    /// Stops the server as a crash would (`immediate`: no checkpoint, connections cut).
    pub fn crash(&self) {
        let mut stop = command_as("postgres", &self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop");
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let mut stop = command_as("postgres", &self.bin.join("pg_ctl"));
        let _ = stop
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A MariaDB server of the test's own (root without a password, database `test`).
pub struct PrivateMariadb {
    pub port: u16,
    data: PathBuf,
    child: Option<std::process::Child>,
    _top: tempfile::TempDir,
}

fn mariadb_program(names: &[&str]) -> PathBuf {
    names
        .iter()
        .flat_map(|n| [format!("/usr/sbin/{n}"), format!("/usr/bin/{n}")])
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{} must be installed (scripts/services installs it)",
                names[0]
            )
        })
}

impl PrivateMariadb {
    /// Initialises a data directory and starts the server.
    pub fn start() -> Self {
        let (top, data) = server_dir("mysql");
        let mut init = command_as(
            "mysql",
            &mariadb_program(&["mariadb-install-db", "mysql_install_db"]),
        );
        init.arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        run(init, "mariadb-install-db");
        let mut db = PrivateMariadb {
            port: free_port(),
            data,
            child: None,
            _top: top,
        };
        db.start_again();
        let mut sql = Command::new(mariadb_program(&["mariadb", "mysql"]));
        sql.args(["-h", "127.0.0.1", "-u", "root", "-P"])
            .arg(db.port.to_string())
            .args(["-e", "CREATE DATABASE IF NOT EXISTS test"]);
        run(sql, "create database test");
        db
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Starts the server (again).
    pub fn start_again(&mut self) {
        let mut cmd = command_as("mysql", &mariadb_program(&["mariadbd", "mysqld"]));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data.display()))
            .arg(format!(
                "--socket={}",
                self.data.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.data.join("mysqld.pid").display()
            ))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--skip-grant-tables=0"])
            .arg(format!(
                "--log-error={}",
                self.data.join("error.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start mariadbd"));
        wait_for_port(self.port, "MariaDB");
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn crash(&mut self) {
        let pid = std::fs::read_to_string(self.data.join("mysqld.pid")).unwrap_or_default();
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "MariaDB did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.data.join("mysqld.pid")).unwrap_or_default();
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}
