//! Container probes (tcpSocket, httpGet, exec) with Kubernetes' timing and thresholds.

use std::net::Ipv4Addr;
use std::ops::ControlFlow;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::launcher::Launcher;

/// What a probe of one container talks to.
pub(crate) struct Target<'a> {
    pub(crate) ip: Ipv4Addr,
    pub(crate) ports: &'a [ContainerPort],
    pub(crate) launcher: &'a Launcher,
}

impl Target<'_> {
    fn port(&self, port: &IntOrString) -> Result<u16, String> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("bad port {n}")),
            IntOrString::String(name) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("the container has no port named {name:?}")),
        }
    }
}

/// One probe attempt; `Err` says why it failed.
async fn check(probe: &Probe, target: &Target<'_>) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let timed_out = || format!("timed out after {timeout:?}");
    if let Some(tcp) = &probe.tcp_socket {
        let port = target.port(&tcp.port)?;
        return match tokio::time::timeout(timeout, TcpStream::connect((target.ip, port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {}:{port}: {e}", target.ip)),
            Err(_) => Err(timed_out()),
        };
    }
    if let Some(http) = &probe.http_get {
        if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err("only HTTP (not HTTPS) httpGet probes are supported".into());
        }
        let port = target.port(&http.port)?;
        let path = http.path.as_deref().unwrap_or("/");
        let get = async {
            let mut stream = TcpStream::connect((target.ip, port)).await?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {}:{port}\r\n\r\n", target.ip);
            stream.write_all(request.as_bytes()).await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            Ok::<_, std::io::Error>(
                String::from_utf8_lossy(&head[9..12])
                    .parse::<u16>()
                    .unwrap_or(0),
            )
        };
        return match tokio::time::timeout(timeout, get).await {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
            Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Ok(Err(e)) => Err(format!("HTTP probe failed: {e}")),
            Err(_) => Err(timed_out()),
        };
    }
    if let Some(exec) = &probe.exec {
        let argv = exec.command.clone().unwrap_or_default();
        let process = target.launcher.spawn_exec(&argv, "probe")?;
        return match tokio::time::timeout(timeout, process.wait()).await {
            Ok(exit) if exit.success() => Ok(()),
            Ok(exit) => Err(format!("command {argv:?} failed: {exit}")),
            Err(_) => {
                process.kill_group();
                Err(format!("command {argv:?} {}", timed_out()))
            }
        };
    }
    Err("the probe has no handler the process kubelet supports (tcpSocket, httpGet, exec)".into())
}

/// Runs `probe` until `report` breaks, calling it whenever the probe's result — after
/// `successThreshold` / `failureThreshold` consecutive attempts — changes (the first result
/// included), with the last failure's message.
pub(crate) async fn run(
    probe: &Probe,
    target: &Target<'_>,
    mut report: impl FnMut(bool, &str) -> ControlFlow<()>,
) {
    let seconds = |value: Option<i32>, default: i32| {
        Duration::from_secs(value.unwrap_or(default).max(0) as u64)
    };
    tokio::time::sleep(seconds(probe.initial_delay_seconds, 0)).await;
    let period = seconds(probe.period_seconds, 10).max(Duration::from_millis(100));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let (mut state, mut successes, mut failures) = (None, 0, 0);
    loop {
        let flow = match check(probe, target).await {
            Ok(()) => {
                successes += 1;
                failures = 0;
                if successes >= success_threshold && state != Some(true) {
                    state = Some(true);
                    report(true, "")
                } else {
                    ControlFlow::Continue(())
                }
            }
            Err(message) => {
                failures += 1;
                successes = 0;
                if failures >= failure_threshold && state != Some(false) {
                    state = Some(false);
                    report(false, &message)
                } else {
                    ControlFlow::Continue(())
                }
            }
        };
        if flow.is_break() {
            return;
        }
        tokio::time::sleep(period).await;
    }
}
