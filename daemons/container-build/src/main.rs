//! `baton-container-build`: the container-build daemon of the `ci` zone (see the
//! crate documentation; arguments, configuration and exit codes are the daemon
//! kit's, `baton_shared::kit`).

fn main() -> std::process::ExitCode {
    baton_shared::kit::main::<baton_container_build::Daemon>()
}
