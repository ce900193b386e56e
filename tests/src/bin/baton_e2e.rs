//! The `baton` command line, under another name (see Cargo.toml).

fn main() -> std::process::ExitCode {
    baton_scheduler::cli::main()
}
