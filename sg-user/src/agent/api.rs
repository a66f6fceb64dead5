//! The agent's local API: a Unix socket through which the `sg_neutron` firewall driver feeds
//! the agent, one request per driver call. The protocol is specified in
//! `sg-user/neutron/PROTOCOL.md`; this module parses requests, checks peers and waits for
//! enforcement. State changes are decided by the agent's loop ([`super::run`]), which owns the
//! pushed document and the datapath, so that every change is serialised with tap events and
//! file changes.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, info, warn};

use super::pushed::Op;
use crate::model::{ValidationErrors, rpc::Plug};

/// The protocol version this agent speaks (PROTOCOL.md). A request names its version; another
/// version is refused with the list of supported ones.
pub const PROTOCOL_VERSION: u64 = 1;

/// The longest request line accepted (a full resync of a large port is far below this).
const MAX_LINE: usize = 16 << 20;

/// The longest wait for enforcement a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// One request, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `hello`: the driver's plugging and name; answered with the protocol versions.
    Hello {
        plug: Option<Plug>,
        client: String,
    },
    /// A driver call that changes the pushed state. `wait`: reply only once the devices of the
    /// call are enforced (prepare_port_filter, update_port_filter).
    Change {
        op: Op,
        wait: Option<Duration>,
    },
    /// `security_group_updated`: sg re-checks flows itself on every policy change (revocation);
    /// nothing to record.
    SecurityGroupUpdated,
    DeferOn,
    /// `filter_defer_apply_off`: apply the batch as one change; `wait` as for `Change`, for
    /// every device the batch prepared or updated.
    DeferOff {
        wait: Option<Duration>,
    },
    /// Whether these devices are enforced, optionally waiting until they all are.
    Enforcement {
        devices: Vec<String>,
        wait: Option<Duration>,
    },
    /// The pushed document.
    State,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Change { op, .. } => match op {
                Op::Plug(_) => "hello",
                Op::Rules { .. } => "update_security_group_rules",
                Op::Members { .. } => "update_security_group_members",
                Op::Port { prepare: true, .. } => "prepare_port_filter",
                Op::Port { prepare: false, .. } => "update_port_filter",
                Op::RemovePort { .. } => "remove_port_filter",
                Op::Trusted { add: true, .. } => "process_trusted_ports",
                Op::Trusted { add: false, .. } => "remove_trusted_ports",
            },
            Request::SecurityGroupUpdated => "security_group_updated",
            Request::DeferOn => "filter_defer_apply_on",
            Request::DeferOff { .. } => "filter_defer_apply_off",
            Request::Enforcement { .. } => "enforcement",
            Request::State => "state",
        }
    }
}

/// Why a request failed; `kind` is part of the protocol.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: &'static str,
    pub message: String,
    /// For `invalid`: every validation error, each with object, id, field, value, reason.
    pub errors: Vec<Value>,
}

impl ApiError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            errors: Vec::new(),
        }
    }

    pub fn invalid(errs: &ValidationErrors) -> Self {
        ApiError {
            kind: "invalid",
            message: format!("rejected, nothing changed:\n{errs}"),
            errors: errs
                .iter()
                .map(|e| {
                    json!({"object": e.object, "id": e.id, "field": e.field, "value": e.value,
                           "reason": e.reason})
                })
                .collect(),
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({"kind": self.kind, "message": self.message});
        if !self.errors.is_empty() {
            e["errors"] = Value::Array(self.errors.clone());
        }
        e
    }
}

/// The agent loop's answer to a call: a response body, and the devices to wait for before it
/// is sent (Neutron device name, tap).
pub struct Reply {
    pub result: Result<Map<String, Value>, ApiError>,
    pub wait: Option<(Vec<(String, String)>, Duration)>,
}

impl Reply {
    pub fn ok(body: Map<String, Value>) -> Self {
        Reply {
            result: Ok(body),
            wait: None,
        }
    }

    pub fn err(e: ApiError) -> Self {
        Reply {
            result: Err(e),
            wait: None,
        }
    }
}

/// A request for the agent loop.
pub struct Call {
    pub conn: u64,
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

pub enum Event {
    Call(Call),
    /// A connection ended: a batch it left open is dropped.
    Closed(u64),
}

/// The taps enforced now, published by the agent loop after every apply and tap change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforced {
    pub taps: BTreeSet<String>,
    pub plug: Option<Plug>,
}

/// `--api-socket` and `--api-group`.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub socket: PathBuf,
    /// The group that owns the socket and may connect; None: only root and the agent's user.
    pub group: Option<String>,
}

/// Binds the socket with mode 0660 and the configured group, then serves connections until the
/// agent exits. The socket is bound under a temporary name and renamed into place once its
/// mode and owner are set, so nobody can connect through a wider mode in between.
pub fn listen(opts: &ApiOptions) -> Result<(UnixListener, Option<u32>)> {
    let gid = opts.group.as_deref().map(group_id).transpose()?;
    let path = &opts.socket;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket: refusing to replace it",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is served by another process (another sg agent?)",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", tmp.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&tmp, None, Some(gid))
            .with_context(|| format!("chown :{gid} {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    info!(socket = %path.display(), group = ?opts.group, "API listening (mode 0660)");
    Ok((listener, gid))
}

/// The numeric id of a group name (or a number).
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let cname = std::ffi::CString::new(name).context("group name")?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16384];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        bail!("--api-group {name}: no such group");
    }
    Ok(grp.gr_gid)
}

/// Accepts connections until the listener fails.
pub async fn serve(
    listener: UnixListener,
    gid: Option<u32>,
    events: mpsc::Sender<Event>,
    enforced: watch::Receiver<Enforced>,
) {
    let mut next_conn = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        next_conn += 1;
        let conn = next_conn;
        match peer_allowed(&stream, gid) {
            Ok(who) => debug!(conn, peer = %who, "API connection"),
            Err(e) => {
                warn!(conn, "API connection refused: {e:#}");
                let mut stream = stream;
                let line = response(None, Err(ApiError::new("denied", format!("{e:#}"))));
                let _ = stream.write_all(line.as_bytes()).await;
                continue;
            }
        }
        tokio::spawn(connection(stream, conn, events.clone(), enforced.clone()));
    }
}

/// SO_PEERCRED: root, the agent's own user, and members of the API group may talk to it.
fn peer_allowed(stream: &UnixStream, gid: Option<u32>) -> Result<String> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let who = format!(
        "pid {} uid {} gid {}",
        cred.pid().unwrap_or(0),
        cred.uid(),
        cred.gid()
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == euid {
        return Ok(who);
    }
    if let Some(gid) = gid {
        if cred.gid() == gid {
            return Ok(who);
        }
        // Supplementary groups are not in SO_PEERCRED; the kernel shows them in /proc.
        if let Some(pid) = cred.pid()
            && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|g| g.split_whitespace().any(|x| x == gid.to_string()))
        {
            return Ok(who);
        }
    }
    bail!("peer {who} is neither root, the agent's user, nor in the API group")
}

async fn connection(
    stream: UnixStream,
    conn: u64,
    events: mpsc::Sender<Event>,
    enforced: watch::Receiver<Enforced>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut lines).take(MAX_LINE as u64).read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) if !line.ends_with('\n') => {
                let e = ApiError::new(
                    "protocol",
                    format!("request longer than {MAX_LINE} bytes, or not ended by a newline"),
                );
                let _ = wr.write_all(response(None, Err(e)).as_bytes()).await;
                break;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(conn, "API read: {e}");
                break;
            }
        }
        let out = match parse(&line) {
            Err((id, e)) => response(id.as_ref(), Err(e)),
            Ok((id, request)) => {
                let name = request.name();
                let (tx, rx) = oneshot::channel();
                if events
                    .send(Event::Call(Call {
                        conn,
                        request,
                        reply: tx,
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
                let Ok(reply) = rx.await else { break };
                let result = finish(reply, enforced.clone()).await;
                if let Err(e) = &result {
                    debug!(
                        conn,
                        op = name,
                        kind = e.kind,
                        "API request failed: {}",
                        e.message
                    );
                }
                response(id.as_ref(), result)
            }
        };
        if wr.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Closed(conn)).await;
}

/// Waits for the reply's devices to be enforced, then adds their state to the body.
async fn finish(
    reply: Reply,
    mut enforced: watch::Receiver<Enforced>,
) -> Result<Map<String, Value>, ApiError> {
    let mut body = reply.result?;
    let Some((devices, timeout)) = reply.wait else {
        return Ok(body);
    };
    let all = |e: &Enforced| devices.iter().all(|(_, tap)| e.taps.contains(tap));
    let done = tokio::time::timeout(timeout, enforced.wait_for(all))
        .await
        .is_ok_and(|r| r.is_ok());
    let now = enforced.borrow().clone();
    let state: Map<String, Value> = devices
        .iter()
        .map(|(d, tap)| (d.clone(), Value::Bool(now.taps.contains(tap))))
        .collect();
    if !done {
        let missing: Vec<&str> = devices
            .iter()
            .filter(|(_, tap)| !now.taps.contains(tap))
            .map(|(d, tap)| if d == tap { d.as_str() } else { tap.as_str() })
            .collect();
        let mut e = ApiError::new(
            "not_enforced",
            format!(
                "applied, but not enforced within {:.1} s: {} (does the tap exist on this host?)",
                timeout.as_secs_f64(),
                missing.join(", ")
            ),
        );
        e.errors = vec![Value::Object(state)];
        return Err(e);
    }
    body.insert("enforced".into(), Value::Object(state));
    Ok(body)
}

fn response(id: Option<&Value>, result: Result<Map<String, Value>, ApiError>) -> String {
    let mut obj = Map::new();
    obj.insert("v".into(), json!(PROTOCOL_VERSION));
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    match result {
        Ok(body) => {
            obj.insert("ok".into(), Value::Bool(true));
            obj.extend(body);
        }
        Err(e) => {
            obj.insert("ok".into(), Value::Bool(false));
            obj.insert("error".into(), e.to_json());
        }
    }
    let mut s = serde_json::to_string(&Value::Object(obj)).expect("JSON values serialise");
    s.push('\n');
    s
}

type ParseError = (Option<Value>, ApiError);

/// One request line: `{"v": 1, "id": ..., "op": NAME, ...arguments}`.
pub fn parse(line: &str) -> Result<(Option<Value>, Request), ParseError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| (None, ApiError::new("protocol", format!("not a JSON object: {e}"))))?;
    let Value::Object(mut m) = v else {
        return Err((None, ApiError::new("protocol", "not a JSON object")));
    };
    let id = m.remove("id");
    let err = |msg: String| (id.clone(), ApiError::new("protocol", msg));
    match m.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION) => {}
        other => {
            let mut e = ApiError::new(
                "version",
                format!(
                    "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
                    other.map_or("(missing)".to_string(), |v| v.to_string())
                ),
            );
            e.errors = vec![json!({"versions": [PROTOCOL_VERSION]})];
            return Err((id, e));
        }
    }
    let op = match m.get("op") {
        Some(Value::String(s)) => s.clone(),
        other => {
            return Err(err(format!(
                "field op: expected a request name, got {}",
                show(other)
            )));
        }
    };
    let string = |key: &str| -> Result<String, ParseError> {
        match m.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            other => Err(err(format!(
                "{op}: field {key}: expected a non-empty string, got {}",
                show(other)
            ))),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, ParseError> {
        match m.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err(format!("{op}: field {key}: expected a list of names"))),
            None | Some(Value::Null) => Ok(Vec::new()),
            other => Err(err(format!(
                "{op}: field {key}: expected a list of names, got {}",
                show(other)
            ))),
        }
    };
    let wait = || -> Result<Option<Duration>, ParseError> {
        match m.get("wait_ms") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                Ok(Some(Duration::from_millis(n.as_u64().unwrap_or(0)).min(MAX_WAIT)))
            }
            other => Err(err(format!(
                "{op}: field wait_ms: expected milliseconds, got {}",
                show(other)
            ))),
        }
    };
    let port = || -> Result<(String, Value), ParseError> {
        match m.get("port") {
            Some(p @ Value::Object(o)) => match o.get("device") {
                Some(Value::String(d)) if !d.is_empty() => Ok((d.clone(), p.clone())),
                other => Err(err(format!(
                    "{op}: field port.device: expected the device name, got {}",
                    show(other)
                ))),
            },
            other => Err(err(format!(
                "{op}: field port: expected a port dict, got {}",
                show(other)
            ))),
        }
    };
    let request = match op.as_str() {
        "hello" => Request::Hello {
            plug: match m.get("plug") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if Plug::parse(p).is_some() => Plug::parse(p),
                other => {
                    return Err(err(format!(
                        "hello: field plug: expected \"direct\" or \"hybrid\", got {}",
                        show(other)
                    )));
                }
            },
            client: m.get("client").and_then(Value::as_str).unwrap_or("").to_string(),
        },
        "update_security_group_rules" => Request::Change {
            op: Op::Rules {
                sg_id: string("sg_id")?,
                rules: match m.get("rules") {
                    Some(Value::Array(r)) => r.clone(),
                    // The functional suite passes `{}` for "no rules".
                    Some(Value::Object(o)) if o.is_empty() => Vec::new(),
                    other => {
                        return Err(err(format!(
                            "{op}: field rules: expected a list of rule dicts, got {}",
                            show(other)
                        )));
                    }
                },
            },
            wait: None,
        },
        "update_security_group_members" => Request::Change {
            op: Op::Members {
                sg_id: string("sg_id")?,
                members: match m.get("members") {
                    Some(v @ Value::Object(_)) => v.clone(),
                    other => {
                        return Err(err(format!(
                            "{op}: field members: expected {{\"IPv4\": [[ip, mac], ...]}}, got {}",
                            show(other)
                        )));
                    }
                },
            },
            wait: None,
        },
        "prepare_port_filter" | "update_port_filter" => {
            let (device, port) = port()?;
            Request::Change {
                op: Op::Port {
                    device,
                    port,
                    prepare: op == "prepare_port_filter",
                },
                wait: wait()?,
            }
        }
        "remove_port_filter" => Request::Change {
            op: Op::RemovePort { device: port()?.0 },
            wait: None,
        },
        "process_trusted_ports" | "remove_trusted_ports" => Request::Change {
            op: Op::Trusted {
                add: op == "process_trusted_ports",
                devices: strings("port_ids")?,
            },
            wait: None,
        },
        "security_group_updated" => Request::SecurityGroupUpdated,
        "filter_defer_apply_on" => Request::DeferOn,
        "filter_defer_apply_off" => Request::DeferOff { wait: wait()? },
        "enforcement" => Request::Enforcement {
            devices: strings("devices")?,
            wait: wait()?,
        },
        "state" => Request::State,
        other => return Err(err(format!("unknown request {other:?}"))),
    };
    Ok((id, request))
}

fn show(v: Option<&Value>) -> String {
    v.map_or("nothing".to_string(), |v| {
        let s = v.to_string();
        if s.len() > 80 {
            format!("{}...", &s[..80])
        } else {
            s
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_what_is_wrong() {
        let (id, r) =
            parse(r#"{"v":1,"id":7,"op":"prepare_port_filter","port":{"device":"tap1"},"wait_ms":500}"#)
                .unwrap();
        assert_eq!(id, Some(json!(7)));
        assert_eq!(
            r,
            Request::Change {
                op: Op::Port {
                    device: "tap1".into(),
                    port: json!({"device": "tap1"}),
                    prepare: true
                },
                wait: Some(Duration::from_millis(500))
            }
        );
        let (_, r) = parse(r#"{"v":1,"op":"update_security_group_rules","sg_id":"g","rules":{}}"#).unwrap();
        assert_eq!(r.name(), "update_security_group_rules");

        let bad = |line: &str| parse(line).unwrap_err().1;
        let e = bad(r#"{"v":2,"op":"state"}"#);
        assert_eq!(e.kind, "version");
        assert!(e.message.contains("speaks 1"), "{}", e.message);
        assert_eq!(bad(r#"{"op":"state"}"#).kind, "version");
        let e = bad(r#"{"v":1,"op":"prepare_port_filter","port":{"mac_address":"x"}}"#);
        assert!(e.message.contains("port.device"), "{}", e.message);
        let e = bad(r#"{"v":1,"op":"update_security_group_members","sg_id":"g","members":[]}"#);
        assert!(e.message.contains("field members"), "{}", e.message);
        assert!(
            bad(r#"{"v":1,"op":"frobnicate"}"#)
                .message
                .contains("unknown request")
        );
        assert_eq!(bad("[1,2]").kind, "protocol");
    }

    #[test]
    fn responses_carry_the_version_the_id_and_the_errors() {
        let errs = crate::model::from_json_str("t", r#"{"security_groups": {"g": [{"direction": "up"}]}}"#)
            .unwrap_err();
        let line = response(Some(&json!("a")), Err(ApiError::invalid(&errs)));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["id"], "a");
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["kind"], "invalid");
        let first = &v["error"]["errors"][0];
        assert_eq!(first["object"], "security_group_rule");
        assert_eq!(first["field"], "direction");
        assert_eq!(first["value"], "\"up\"");
        assert!(first["reason"].as_str().unwrap().contains("ingress"));
    }
}
