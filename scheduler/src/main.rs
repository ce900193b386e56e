//! `baton`: the scheduler and the operator's command line.

fn main() -> std::process::ExitCode {
    baton_scheduler::cli::main()
}
