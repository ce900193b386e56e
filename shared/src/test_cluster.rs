//! A real Kubernetes control plane for the deploying daemons' tests (features
//! `testing` and `kube`): etcd, kube-apiserver and kube-controller-manager
//! started once per test binary from the workspace's `../shared/k8s` (or
//! `BATON_K8S_DIR`), and per test a namespace with a simulated node.
//!
//! The node is the only thing simulated: it registers a Node, binds the
//! namespace's pending pods to it, and sets their status as the test declares
//! per container image ([`Behaviour`]): ready, never ready, crash-looping, or
//! (Job pods) exiting with a code after writing a log, which the API server
//! reads from the node's kubelet endpoint (HTTPS, as from a real kubelet).
//! Deployments, ReplicaSets, rollouts, their deadlines, Jobs and everything
//! else are the real controllers' work.
//!
//! The control plane stops when the test process is gone (a watcher process
//! polls it), and its data directory goes with it.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// A running control plane.
pub struct ControlPlane {
    pub kubeconfig: PathBuf,
}

static PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The test binary's control plane, started on first use.
///
/// # Panics
/// When it cannot start, with what is missing (etcd, the binaries) and the logs.
pub fn control_plane() -> &'static ControlPlane {
    match PLANE.get_or_init(start) {
        Ok(p) => p,
        Err(e) => panic!("cannot start a Kubernetes control plane for this test: {e}"),
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the shared crate is in the workspace")
        .to_path_buf()
}

/// Where the control plane's binaries and scripts come from.
pub fn k8s_dir() -> PathBuf {
    std::env::var_os("BATON_K8S_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/k8s"))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot run: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} failed ({}): {text}", out.status))
    }
}

/// Unpacks the binaries (once per workspace) and makes the PKI (once).
fn prepare(k8s: &Path, base: &Path) -> Result<(PathBuf, PathBuf), String> {
    let bin = base.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for name in ["kube-apiserver", "kube-controller-manager"] {
        let target = bin.join(name);
        if target.exists() {
            continue;
        }
        let packed = k8s.join(format!("{name}.xz"));
        if !packed.exists() {
            return Err(format!(
                "{} is missing: set BATON_K8S_DIR to the folder with kube-apiserver.xz",
                packed.display()
            ));
        }
        // Unpacked under a name of its own, then renamed: concurrent test
        // binaries never see half a file.
        let part = bin.join(format!("{name}.{}", std::process::id()));
        run(
            Command::new("sh").arg("-c").arg(format!(
                "xz -dc '{}' > '{}' && chmod +x '{}'",
                packed.display(),
                part.display(),
                part.display()
            )),
            &format!("unpacking {name}"),
        )?;
        std::fs::rename(&part, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    let pki = base.join("pki");
    if !pki.join("tokens.csv").exists() {
        let part = base.join(format!("pki.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&part);
        run(
            Command::new("bash").arg(k8s.join("gen-pki.sh")).env("PKI", &part),
            "gen-pki.sh",
        )?;
        // Another binary may have won the race; its PKI is as good.
        if std::fs::rename(&part, &pki).is_err() {
            let _ = std::fs::remove_dir_all(&part);
        }
    }
    Ok((bin, pki))
}

fn start() -> Result<ControlPlane, String> {
    let k8s = k8s_dir();
    let base = workspace().join("target/k8s");
    let (bin, pki) = prepare(&k8s, &base)?;
    let run_dir = std::env::temp_dir().join(format!(
        "baton-k8s-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    // The watcher first: whatever happens next, the processes and their data
    // go when this process does.
    let watcher = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; RUN='{run}' bash '{stop}'; rm -rf '{run}'",
        pid = std::process::id(),
        run = run_dir.display(),
        stop = k8s.join("stop-control-plane.sh").display(),
    );
    Command::new("setsid")
        .args(["bash", "-c", &watcher])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the control plane's watcher: {e}"))?;
    let mut cmd = Command::new("bash");
    cmd.arg(k8s.join("start-control-plane.sh"))
        .env("BIN", &bin)
        .env("PKI", &pki)
        .env("RUN", &run_dir)
        .env("API_PORT", free_port()?.to_string())
        .env("ETCD_PORT", free_port()?.to_string())
        .env("ETCD_PEER_PORT", free_port()?.to_string())
        .env("KCM_PORT", free_port()?.to_string())
        .stdin(Stdio::null());
    run(
        &mut cmd,
        "start-control-plane.sh (needs Debian's etcd-server and etcd-client)",
    )?;
    Ok(ControlPlane {
        kubeconfig: run_dir.join("admin.kubeconfig"),
    })
}

/// The simulated kubelet's HTTPS endpoint, where the API server reads
/// container logs (`GET /containerLogs/{namespace}/{pod}/{container}`): one
/// per test process, on a thread of its own (each test has its own runtime).
struct Kubelet {
    port: u16,
    /// Log text by `namespace/pod/container`.
    logs: Arc<Mutex<HashMap<String, String>>>,
}

static KUBELET: OnceLock<Kubelet> = OnceLock::new();

fn kubelet() -> &'static Kubelet {
    KUBELET.get_or_init(|| start_kubelet().unwrap_or_else(|e| panic!("cannot start the simulated kubelet: {e}")))
}

fn start_kubelet() -> Result<Kubelet, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = std::env::temp_dir().join(format!("baton-kubelet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        "openssl (the kubelet's certificate)",
    )?;
    let certs = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let logs: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let served = logs.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, logs) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let logs = logs.clone();
                        async move { Ok::<_, std::convert::Infallible>(container_log(&logs, req.uri())) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    Ok(Kubelet { port, logs })
}

fn container_log(
    logs: &Mutex<HashMap<String, String>>,
    uri: &hyper::Uri,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let text = uri
        .path()
        .strip_prefix("/containerLogs/")
        .and_then(|key| logs.lock().unwrap().get(key).cloned());
    let Some(text) = text else {
        return hyper::Response::builder()
            .status(404)
            .body(http_body_util::Full::new(hyper::body::Bytes::from_static(
                b"no such container log",
            )))
            .expect("a response");
    };
    let tail = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("tailLines=").and_then(|n| n.parse::<usize>().ok()));
    let lines: Vec<&str> = text.lines().collect();
    let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
    let body = lines[from..].iter().map(|l| format!("{l}\n")).collect::<String>();
    hyper::Response::builder()
        .header("content-type", "text/plain")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .expect("a response")
}

/// What the simulated node makes of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Running and ready at once.
    Ready,
    /// Running, never ready (a failing readiness probe).
    Unready,
    /// Restarting over and over (`CrashLoopBackOff`, restart count rising).
    CrashLoop,
    /// Runs, then exits with this code (Job pods; `restartPolicy: Never`),
    /// having written this log (served as the kubelet serves container logs).
    Exit(i32, String),
}

#[derive(Default)]
struct Agent {
    /// Behaviour by container image; unlisted images are [`Behaviour::Ready`].
    by_image: HashMap<String, Behaviour>,
    /// Restarts of crash-looping pods, by pod name.
    restarts: HashMap<String, i32>,
}

/// A namespace of its own with a node of its own, for one test.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    pub kubeconfig: PathBuf,
    agent: Arc<Mutex<Agent>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestNamespace {
    /// `<prefix>-<random>` with its node running.
    pub async fn new(prefix: &str) -> Self {
        let plane = control_plane();
        let client = crate::cluster::connect(&plane.kubeconfig)
            .await
            .expect("connect to the test control plane");
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        register_node(&client, &name).await;
        let agent = Arc::new(Mutex::new(Agent::default()));
        let task = tokio::spawn(node_loop(client.clone(), name.clone(), agent.clone()));
        Self {
            name,
            client,
            kubeconfig: plane.kubeconfig.clone(),
            agent,
            task,
        }
    }

    /// From now on, containers running `image` behave as `b`.
    pub fn behave(&self, image: &str, b: Behaviour) {
        self.agent.lock().unwrap().by_image.insert(image.to_owned(), b);
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        self.task.abort();
        // Pods go with their namespace at once (no kubelet to wait for).
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "--wait=false",
                "--grace-period=0",
                "--force",
                "namespace",
                &self.name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "--wait=false", "node", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn node_status() -> Value {
    let t = now();
    json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "simulated node", "lastHeartbeatTime": t, "lastTransitionTime": t}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet().port}},
        "capacity": {"cpu": "16", "memory": "64Gi", "pods": "250"},
        "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "250"},
    }})
}

async fn register_node(client: &Client, name: &str) {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &node)
        .await
        .expect("register the test node");
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(node_status()))
        .await
        .expect("set the test node ready");
}

async fn node_loop(client: Client, ns: String, agent: Arc<Mutex<Agent>>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let mut beat = tokio::time::Instant::now();
    loop {
        if beat.elapsed() >= Duration::from_secs(10) {
            let _ = nodes
                .patch_status(&ns, &PatchParams::default(), &Patch::Merge(node_status()))
                .await;
            beat = tokio::time::Instant::now();
        }
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for pod in list.items {
                tend(&pods, &ns, &pod, &agent).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One pass of the node over one pod.
async fn tend(pods: &Api<Pod>, node: &str, pod: &Pod, agent: &Arc<Mutex<Agent>>) {
    let name = pod.name_any();
    if pod.metadata.deletion_timestamp.is_some() {
        let _ = pods.delete(&name, &DeleteParams::default().grace_period(0)).await;
        return;
    }
    let Some(spec) = &pod.spec else { return };
    if spec.node_name.is_none() {
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        let _ = pods
            .create_subresource::<Value, Value>("binding", &name, &PostParams::default(), &binding)
            .await;
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" {
        return;
    }
    let behaviour = {
        let a = agent.lock().unwrap();
        spec.containers
            .iter()
            .find_map(|c| c.image.as_ref().and_then(|i| a.by_image.get(i)).cloned())
            .unwrap_or(Behaviour::Ready)
    };
    let current_ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let restarts = {
        let mut a = agent.lock().unwrap();
        let r = a.restarts.entry(name.clone()).or_insert(0);
        if behaviour == Behaviour::CrashLoop && phase == "Running" {
            *r += 1;
        }
        *r
    };
    let wanted_ready = behaviour == Behaviour::Ready;
    let settled = phase == "Running" && current_ready == wanted_ready;
    let exits = matches!(behaviour, Behaviour::Exit(..)) && phase == "Running";
    if settled && behaviour != Behaviour::CrashLoop && !exits {
        return;
    }
    let t = now();
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|s| s.0.to_string())
        .unwrap_or_else(|| t.clone());
    let cond = |type_: &str, ok: bool| json!({"type": type_, "status": if ok { "True" } else { "False" }, "lastTransitionTime": t});
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            let state = match &behaviour {
                Behaviour::Ready | Behaviour::Unready => json!({"running": {"startedAt": started}}),
                Behaviour::CrashLoop => json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off restarting failed container {}", c.name)}}),
                Behaviour::Exit(code, _) if exits => json!({"terminated": {"exitCode": code,
                    "reason": if *code == 0 { "Completed" } else { "Error" }, "startedAt": started, "finishedAt": t}}),
                Behaviour::Exit(..) => json!({"running": {"startedAt": started}}),
            };
            let mut status = json!({"name": c.name, "image": image, "imageID": "", "ready": wanted_ready,
                                    "started": !matches!(behaviour, Behaviour::CrashLoop),
                                    "restartCount": restarts, "state": state});
            if behaviour == Behaviour::CrashLoop {
                status["lastState"] =
                    json!({"terminated": {"exitCode": 1, "reason": "Error", "startedAt": started, "finishedAt": t}});
            }
            status
        })
        .collect();
    let new_phase = match &behaviour {
        Behaviour::Exit(0, _) if exits => "Succeeded",
        Behaviour::Exit(..) if exits => "Failed",
        _ => "Running",
    };
    if let Behaviour::Exit(_, log) = &behaviour
        && exits
    {
        let mut logs = kubelet().logs.lock().unwrap();
        for c in &spec.containers {
            logs.insert(format!("{node}/{name}/{}", c.name), log.clone());
        }
    }
    let patch = json!({"status": {
        "phase": new_phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": started,
        "conditions": [cond("Initialized", true), cond("Ready", wanted_ready),
                       cond("ContainersReady", wanted_ready), cond("PodScheduled", true)],
        "containerStatuses": containers,
    }});
    let _ = pods
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await;
}
