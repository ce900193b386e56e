//! Pebble, Let's Encrypt's ACME test server (Debian's `pebble`), for tests and
//! the demo (feature `testing`): a real ACME server issuing real certificates
//! from a root of its own. Its listener certificate is made here with
//! `openssl` from a CA of the test's; DNS-01 challenges are looked up at the
//! DNS server it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testing::TempDir;

/// A running pebble, stopped when dropped.
pub struct Pebble {
    /// The ACME directory.
    pub directory_url: String,
    /// The CA that signed pebble's listener certificate (PEM file): what an
    /// ACME client must trust to talk to it.
    pub listener_ca: PathBuf,
    /// The root pebble issues under (PEM file): what the issued certificates
    /// chain to.
    pub issuing_root: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`, `ca.key`) and a certificate it signs for `names` (DNS
/// names and IP addresses), as `<stem>.pem` and `<stem>.key`.
pub fn test_ca(dir: &Path, stem: &str, names: &[&str]) {
    if !dir.join("ca.pem").exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "3650",
                "-subj",
                "/CN=Baton test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    std::fs::write(
        dir.join(format!("{stem}.ext")),
        format!(
            "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
            san.join(",")
        ),
    )
    .expect("write the extensions");
    let (key, csr, pem, ext) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.pem"),
        format!("{stem}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={}", names[0]),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "825",
            "-sha256",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// `GET https://addr/path`, trusting `ca` only: the body.
async fn get(addr: SocketAddr, ca: &Path, path: &str) -> std::io::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if !out.starts_with(b"HTTP/1.0 200") && !out.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out[..split]).into_owned(),
        ));
    }
    Ok(out[split + 4..].to_vec())
}

impl Pebble {
    /// Starts pebble looking up names at `dns`, validating HTTP-01 on
    /// `http_port` of the address a host resolves to, and refusing to issue
    /// for `blocked` domains; returns once it serves its directory.
    pub async fn start(dns: SocketAddr, http_port: Option<u16>, blocked: &[&str]) -> Self {
        let dir = TempDir::new("pebble");
        test_ca(dir.path(), "listener", &["localhost", "127.0.0.1"]);
        let (port, management) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("listener.pem"),
            "privateKey": dir.path().join("listener.key"),
            "httpPort": http_port.unwrap_or_else(free_port),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": blocked,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).expect("write pebble's config");
        // Pebble makes its keys and root at start and says when it serves
        // its directory (after its management interface).
        let child = crate::testing::start_logged(
            Command::new("pebble")
                .args(["-config", "pebble.json", "-dnsserver", &dns.to_string(), "-strict"])
                .current_dir(dir.path())
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0"),
            &dir.path().join("pebble.log"),
            "ACME directory available at",
        );
        let pebble = Self {
            directory_url: format!("https://127.0.0.1:{port}/dir"),
            listener_ca: dir.path().join("ca.pem"),
            issuing_root: dir.path().join("root.pem"),
            child,
            _dir: dir,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], management).into();
        // Its servers start listening right after it logs: a connection
        // refused in that instant is tried again at once.
        let mut root = get(addr, &pebble.listener_ca, "/roots/0").await;
        for _ in 0..1000 {
            match &root {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tokio::task::yield_now().await;
                    root = get(addr, &pebble.listener_ca, "/roots/0").await;
                }
                _ => break,
            }
        }
        let root = root.unwrap_or_else(|e| panic!("pebble's root: {e}\n{}", pebble.log()));
        std::fs::write(&pebble.issuing_root, root).expect("write pebble's root");
        // The directory answers too.
        let dir_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        get(dir_addr, &pebble.listener_ca, "/dir")
            .await
            .expect("pebble serves its directory");
        pebble
    }

    /// Pebble's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("pebble.log")).unwrap_or_default()
    }
}
