//! `sluice`: the command line. `sync` runs a pipeline once (on the embedded warehouse, or
//! PostgreSQL with `--database-url`); `quarantine` shows rejected rows; `finance` answers
//! AR/AP aging; `tenant` and `migrate` provision the PostgreSQL warehouse. Each command
//! family lives in its own file under `cli/`.

mod cli;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, dispatch};
fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let telemetry = telemetry::init(cli.log_format, cli.quiet, runtime.handle());
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(1)
        }
    };
    // The last spans go out while the runtime that sends them still runs.
    telemetry.shutdown();
    code
}

/// An error and its causes, each said once: sluice's errors already end with their
/// cause's text, so a cause the text holds is not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("connection reset");
        let wrapped = anyhow::Error::new(io).context("reading the file: connection reset");
        assert_eq!(error_text(&wrapped), "reading the file: connection reset");
        let io = std::io::Error::other("connection reset");
        let bare = anyhow::Error::new(io).context("reading the file");
        assert_eq!(error_text(&bare), "reading the file: connection reset");
    }
}
