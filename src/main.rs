//! `sdbatch`: command-line entry point. Each subcommand lives in `cli/`.

// Clippy computes the layout of deeply nested async blocks (the worker inside `bench --planner`),
// which goes past the default query depth of 128.
#![recursion_limit = "256"]
mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before anything can query CUDA: see `sdbatch::device::init`.
    sdbatch::device::init();
    let args = cli::Cli::parse();
    cli::init_logging(args.log_format);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping causes whose text the message already contains (many
/// library errors repeat their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}
