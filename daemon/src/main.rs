//! `qlorad`: the daemon and its one-shot commands.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = qlorad::config_file::apply(&argv) {
        eprintln!("qlorad: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let args = qlorad::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QLORAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match qlorad::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first. Some library errors append a
            // backtrace on later lines (candle with RUST_BACKTRACE set): keep the first line of each.
            let first_line = |s: String| s.lines().next().unwrap_or_default().to_string();
            let mut msg = first_line(e.to_string());
            for cause in e.chain().skip(1) {
                let c = first_line(cause.to_string());
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("qlorad: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
