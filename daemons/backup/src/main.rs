//! `baton-backup`: the backup daemon for one zone (see the crate documentation;
//! arguments, configuration and exit codes are the daemon kit's,
//! `baton_shared::kit`, plus `--keygen FILE` and `--scheduled-pass`).

fn main() -> std::process::ExitCode {
    baton_shared::kit::main::<baton_backup::Daemon>()
}
