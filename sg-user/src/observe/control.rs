//! The agent's control socket, `<run-dir>/control.sock`, behind `sg monitor` and `sg debug`.
//!
//! A client sends one JSON request line and reads JSON reply lines:
//! - `{"monitor": {"port": "ID|TAP"|null, "reasons": ["drop-no-rule", ...], "rate": N, "burst": M}}`:
//!   `{"ok": "..."}`, then one line per verdict until the client goes. The datapath sends
//!   monitor events only while at least one such client is connected.
//! - `{"debug": {"port": "ID|TAP", "on": true|false}}`: `{"ok": "..."}` or `{"error": "..."}`.
//!
//! Each connection has its own thread; the reconcile loop only sees `sg debug` requests, through
//! a channel, since switching a port's programs is its business.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering, mpsc},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{CLIENT_CHECK, MonitorFilter, Monitors, Shared, reason_code};

pub const SOCKET: &str = "control.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Monitor(MonitorRequest),
    Debug(DebugRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorRequest {
    pub port: Option<String>,
    #[serde(default)]
    pub reasons: Vec<String>,
    pub rate: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebugRequest {
    pub port: String,
    pub on: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(String),
    Error(String),
}

/// A `sg debug` request on its way to the reconcile loop, with where its answer goes.
pub struct DebugCall {
    pub request: DebugRequest,
    pub reply: mpsc::Sender<Result<String, String>>,
}

/// Lines a monitor client may lag behind before lines are dropped for it (and counted).
const CLIENT_QUEUE: usize = 4096;

/// Listens on `<run_dir>/control.sock` (replacing a stale socket file) until the process ends.
pub fn serve(
    run_dir: &Path,
    shared: Shared,
    monitors: Arc<Monitors>,
    debug: tokio::sync::mpsc::UnboundedSender<DebugCall>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir)?;
    let path = run_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::Builder::new()
        .name("sg-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (shared, monitors, debug) = (shared.clone(), monitors.clone(), debug.clone());
                let _ = std::thread::Builder::new()
                    .name("sg-client".into())
                    .spawn(move || {
                        if let Err(e) = client(conn, &shared, &monitors, &debug) {
                            warn!("control socket client: {e:#}");
                        }
                    });
            }
        })?;
    Ok(path)
}

fn reply(conn: &mut UnixStream, r: &Reply) -> Result<()> {
    conn.write_all(format!("{}\n", serde_json::to_string(r)?).as_bytes())?;
    Ok(())
}

fn client(
    mut conn: UnixStream,
    shared: &Shared,
    monitors: &Monitors,
    debug: &tokio::sync::mpsc::UnboundedSender<DebugCall>,
) -> Result<()> {
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return reply(&mut conn, &Reply::Error(format!("bad request: {e}"))),
    };
    match req {
        Request::Debug(request) => {
            let (tx, rx) = mpsc::channel();
            if debug.send(DebugCall { request, reply: tx }).is_err() {
                return reply(&mut conn, &Reply::Error("the agent is stopping".into()));
            }
            let r = match rx.recv() {
                Ok(Ok(s)) => Reply::Ok(s),
                Ok(Err(s)) => Reply::Error(s),
                Err(_) => Reply::Error("the agent dropped the request".into()),
            };
            reply(&mut conn, &r)
        }
        Request::Monitor(m) => monitor(conn, m, shared, monitors),
    }
}

fn monitor(mut conn: UnixStream, m: MonitorRequest, shared: &Shared, monitors: &Monitors) -> Result<()> {
    let view = shared.view();
    let port_idx = match &m.port {
        None => None,
        Some(p) => match view.find_port(p) {
            Ok((idx, _)) => Some(idx),
            Err(e) => return reply(&mut conn, &Reply::Error(e)),
        },
    };
    let mut reasons = 0u64;
    for r in &m.reasons {
        match reason_code(r) {
            Some(c) => reasons |= 1 << c,
            None => {
                return reply(
                    &mut conn,
                    &Reply::Error(format!("unknown reason {r:?} (see `sg stats` for the names)")),
                );
            }
        }
    }
    if reasons == 0 {
        reasons = u64::MAX;
    }
    if m.rate == 0 || m.burst == 0 {
        return reply(
            &mut conn,
            &Reply::Error("rate and burst must be at least 1".into()),
        );
    }
    let (tx, rx) = mpsc::sync_channel::<String>(CLIENT_QUEUE);
    let filter = MonitorFilter {
        port_idx,
        reasons,
        rate: m.rate,
        burst: m.burst,
    };
    let (id, dropped) = monitors.attach(filter, tx)?;
    info!(port = ?m.port, reasons = ?m.reasons, "monitor attached");
    let result = (|| -> Result<()> {
        reply(
            &mut conn,
            &Reply::Ok(format!(
                "monitoring {} (at most {}/s, bursts of {}); Ctrl-C to stop",
                m.port.as_deref().unwrap_or("every port"),
                m.rate,
                m.burst
            )),
        )?;
        let mut reported = 0;
        loop {
            match rx.recv_timeout(CLIENT_CHECK) {
                Ok(line) => conn.write_all(format!("{line}\n").as_bytes())?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if closed(&conn) {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let d = dropped.load(Ordering::Relaxed);
            if d != reported {
                conn.write_all(
                    format!("... {} lines dropped: this client is too slow\n", d - reported).as_bytes(),
                )?;
                reported = d;
            }
        }
    })();
    monitors.detach(id);
    info!(port = ?m.port, "monitor detached");
    result
}

/// Whether the peer has closed the connection (readable with nothing to read, or hung up).
fn closed(conn: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
        return false;
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        return true;
    }
    let mut b = [0u8; 1];
    // SAFETY: reads at most one byte into `b`, without waiting.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    n == 0
}

/// Client side: sends `req` to the agent under `run_dir` and returns the connection after a
/// successful first reply.
pub fn call(run_dir: &Path, req: &Request) -> Result<(String, BufReader<UnixStream>)> {
    let path = run_dir.join(SOCKET);
    let mut conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to the agent at {} (is `sg agent` running?)",
            path.display()
        )
    })?;
    conn.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Ok(s)) => {
            r.get_ref().set_read_timeout(None)?;
            Ok((s, r))
        }
        Ok(Reply::Error(e)) => bail!("{e}"),
        Err(_) if line.is_empty() => bail!("the agent closed the connection"),
        Err(e) => bail!("unexpected reply {line:?}: {e}"),
    }
}
