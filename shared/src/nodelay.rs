//! Turns Nagle's algorithm off on this process's TCP sockets.
//!
//! sqlx 0.9.0 leaves it on (sqlx issue #4335; 0.8 turned it off). In plain
//! text a statement leaves in one `write`, so it does not matter; over TLS a
//! large statement leaves as several records, and the last one waits for the
//! server's delayed ACK, about 40 ms. Under load that halved the scheduler's
//! throughput (BENCHMARKS.md, session 7). sqlx offers no hook on its socket, so
//! this is called right after a connection is made, and it sets `TCP_NODELAY`
//! on every socket the process has open: for other TCP sockets (the broker's,
//! HTTP) it is harmless, and other kinds of socket refuse the option.
//! Remove it once sqlx sets the option itself.

/// Sets `TCP_NODELAY` on every TCP socket of this process (Linux; elsewhere nothing).
pub fn on_every_tcp_socket() {
    #[cfg(target_os = "linux")]
    linux::on_every_tcp_socket();
}

#[cfg(target_os = "linux")]
mod linux {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    /// Each socket is reached through a duplicate of its descriptor
    /// (`pidfd_getfd` on this very process, Linux 5.6 and later), so no
    /// descriptor this code does not own is ever touched: one closed since it
    /// was listed is simply not found, and one reused for another socket gets
    /// the option too, which is what is wanted anyway.
    pub fn on_every_tcp_socket() {
        let (Ok(fds), Ok(me)) = (
            std::fs::read_dir("/proc/self/fd"),
            pidfd_open(getpid(), PidfdFlags::empty()),
        ) else {
            return;
        };
        for entry in fds.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_str().is_some_and(|t| t.starts_with("socket:")));
            if is_socket && let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) {
                // Other kinds of socket refuse the option; nothing to do about them.
                let _ = rustix::net::sockopt::set_tcp_nodelay(&dup, true);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_tcp_socket_gets_nodelay() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            stream.set_nodelay(false).unwrap();
            assert!(!stream.nodelay().unwrap());
            super::on_every_tcp_socket();
            assert!(stream.nodelay().unwrap(), "TCP_NODELAY was not set");
        }
    }
}
