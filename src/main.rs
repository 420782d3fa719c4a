//! `sdbatch`: command-line entry point. Each subcommand lives in `cli/`.
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
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
