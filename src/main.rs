//! `sluice`: the command line. `sync` runs a pipeline once (on the embedded warehouse, or
//! PostgreSQL with `--database-url`); `quarantine` shows rejected rows; `finance` answers
//! AR/AP aging; `tenant` and `migrate` provision the PostgreSQL warehouse. Each command
//! family lives in its own file under `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, LogFormat, dispatch};
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
