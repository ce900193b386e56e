//! Turns Nagle's algorithm off on this process's TCP sockets.
//!
//! sqlx 0.9.0 leaves it on (0.8 turned it off). In plain
//! text a statement leaves in one `write`, so it does not matter; over TLS a
//! large statement leaves as several records, and the last one waits for the
//! server's delayed ACK, about 40 ms. Under load that halved the scheduler's
//! throughput (BENCHMARKS.md, "TLS, Nagle, and where a transition's time goes"). sqlx offers no hook on its socket, so
//! this is called right after a connection is made, and it sets `TCP_NODELAY`
//! on every socket the process has open: for other TCP sockets (the broker's,
//! HTTP) it is harmless, and other kinds of socket refuse the option.
//! An sqlx that sets the option itself makes this unnecessary.

/// Sets `TCP_NODELAY` on every TCP socket of this process (Linux; elsewhere nothing).
pub fn on_every_tcp_socket() {
    #[cfg(target_os = "linux")]
    linux::on_every_tcp_socket();
}

#[cfg(target_os = "linux")]
mod linux {
    pub fn on_every_tcp_socket() {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for entry in fds.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_str().is_some_and(|t| t.starts_with("socket:")));
            if is_socket {
                set_nodelay(fd);
            }
        }
    }

    /// `setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, 1)`, errors ignored.
    ///
    /// Through a descriptor number this code does not own, so it is a plain
    /// system call rather than a borrowed `OwnedFd` (whose contract, that the
    /// descriptor stays open, another thread could break). Safe alternatives
    /// were tried: `pidfd_getfd` on the process itself duplicates the
    /// descriptor without `unsafe`, but the default seccomp profiles of Docker
    /// and containerd refuse it without `CAP_SYS_PTRACE`, where Baton runs.
    #[allow(unsafe_code)]
    fn set_nodelay(fd: libc::c_int) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which
        // outlives the call, and writes no memory. To the kernel the
        // descriptor is a number: closed since it was listed, the call fails
        // (EBADF); reused for something that is not a TCP socket, it fails
        // (ENOTSOCK, EOPNOTSUPP, ENOPROTOOPT); reused for another TCP socket
        // of this process, that socket gets the option, which is wanted anyway.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
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
