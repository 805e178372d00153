//! The `sluice` binary as the tests run it: on a data directory of their own, with the
//! machine's warehouse, queue and log settings left out.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `sluice --data-dir DATA`, the environment's SLUICE_LOG, SLUICE_REDIS_URL and
/// SLUICE_DATABASE_URL removed; arguments and the rest are the caller's.
pub fn sluice_at(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.arg("--data-dir")
        .arg(data)
        .env_remove("SLUICE_LOG")
        .env_remove("SLUICE_REDIS_URL")
        .env_remove("SLUICE_DATABASE_URL")
        .stdin(Stdio::null());
    c
}

/// Runs `sluice --data-dir DATA ARGS` to its end.
pub fn sluice(data: &Path, args: &[&str]) -> Output {
    sluice_at(data).args(args).output().expect("run sluice")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}
