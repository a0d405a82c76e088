//! `edgeshift`: the agent and operator command line.

mod cli;

fn main() -> std::process::ExitCode {
    let args = match cli::Cli::parse_with_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    edgeshift_common::service::init_logging(args.verbose, args.log_format);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
