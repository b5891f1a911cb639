//! Start-to-ready measurement: spawn a service, poll its readiness URL every
//! `poll` until it answers `200`, note when its `listening` log line
//! appeared, read its resident memory, then stop it with SIGTERM and time the
//! exit. Blocking code on purpose (no runtime in the way of the clock).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One start of one service.
#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    /// From just before `spawn` (fork + exec) to the first `200` of the
    /// readiness URL.
    pub ready_ms: f64,
    /// From spawn to the first stdout line containing `"listening"`, when
    /// the service prints one.
    pub listening_log_ms: Option<f64>,
    /// `VmRSS` right after ready, KiB.
    pub rss_at_ready_kib: Option<u64>,
    /// From SIGTERM to exit.
    pub exit_ms: f64,
    /// The exit status after SIGTERM (`None`: killed by a signal).
    pub exit_code: Option<i32>,
}

/// Errors of one measurement.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("not ready within {0:?}")]
    NotReady(Duration),
    #[error("the process exited before it was ready ({0})")]
    Exited(std::process::ExitStatus),
    #[error("cannot signal the process: {0}")]
    Signal(std::io::Error),
}

/// Starts `command`, waits for `GET ready_path` on `addr` to answer `200`
/// (polling every `poll`, at most `deadline`), then stops it.
pub fn measure(
    command: &[String],
    addr: SocketAddr,
    ready_path: &str,
    poll: Duration,
    deadline: Duration,
) -> Result<Startup, StartupError> {
    let (program, args) = command.split_first().expect("a command");
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StartupError::Spawn(program.clone(), e))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains("\"listening\"") {
                let _ = tx.send(t0.elapsed());
                sent = true;
            }
        }
    });
    let ready = loop {
        if probe(addr, ready_path) {
            break t0.elapsed();
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartupError::Exited(status));
        }
        if t0.elapsed() > deadline {
            stop(&mut child).ok();
            return Err(StartupError::NotReady(deadline));
        }
        thread::sleep(poll);
    };
    let rss_at_ready_kib = rss_kib(child.id());
    let listening = rx.recv_timeout(Duration::from_millis(200)).ok();
    let stopping = Instant::now();
    let status = stop(&mut child)?;
    Ok(Startup {
        ready_ms: ms(ready),
        listening_log_ms: listening.map(ms),
        rss_at_ready_kib,
        exit_ms: ms(stopping.elapsed()),
        exit_code: status.code(),
    })
}

fn stop(child: &mut Child) -> Result<std::process::ExitStatus, StartupError> {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().map_err(StartupError::Signal)?;
    let waited = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(StartupError::Signal)? {
            return Ok(status);
        }
        if waited.elapsed() > Duration::from_secs(30) {
            child.kill().map_err(StartupError::Signal)?;
            return child.wait().map_err(StartupError::Signal);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// `GET path` over a fresh connection; true on a `200` status line.
fn probe(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// The resident set size of `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
