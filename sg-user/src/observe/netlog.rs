//! The security-group log, one line per event, as Neutron's OVS log driver writes it
//! (`neutron/services/logapi/drivers/openvswitch/ovs_firewall_log.py`, `packet_in_handler`):
//!
//! ```text
//! action=ACCEPT project_id=<project> log_resource_ids=['<log id>', ...] vm_port=<port id> pkt=<os_ken packet>
//! ```
//!
//! To a file, each line carries oslo.log's default prefix (`local_output_log_base` uses
//! `logging_default_format_string`): `2026-01-02 03:04:05.678 <pid> INFO <logger> [-] `. To
//! syslog (Neutron's default when no file is set), the message alone.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use sg_common::*;

use super::{View, captured, event_time, local_time, pkt};

/// The logger name in file lines: sg's, in the place of Neutron's module path.
pub const LOGGER: &str = "sg.network_log";

/// The message of one event, or None when its port is not in the view.
pub fn message(e: &Event, view: &View) -> Option<String> {
    let port = view.ports.get(&e.port_idx)?;
    let (action, ids, project) = if e.flags & EVENT_F_LOG_DROP != 0 {
        ("DROP", &port.log.drop, &port.log.drop_project)
    } else {
        ("ACCEPT", &port.log.accept, &port.log.accept_project)
    };
    if ids.is_empty() {
        return None;
    }
    let ids = ids
        .iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "action={action} project_id={project} log_resource_ids=[{ids}] vm_port={} pkt={}",
        port.id,
        pkt::os_ken(captured(e))
    ))
}

/// The message with oslo.log's file prefix.
pub fn line(e: &Event, view: &View) -> Option<String> {
    let msg = message(e, view)?;
    let (date, _) = local_time(event_time(e));
    Some(format!("{date} {} INFO {LOGGER} [-] {msg}", std::process::id()))
}

/// Where the lines go (`--log-output`).
pub enum Sink {
    /// A file, reopened when it is rotated away (moved or deleted), as Python's
    /// WatchedFileHandler that Neutron uses does.
    File { path: PathBuf, file: File, ino: u64 },
    /// syslog(3), facility user, ident `sg`.
    Syslog,
}

impl Sink {
    pub fn open(spec: &str) -> Result<Self> {
        if spec == "syslog" {
            static IDENT: &[u8] = b"sg\0";
            // SAFETY: a static NUL-terminated ident, as openlog keeps the pointer.
            unsafe { libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_USER) };
            return Ok(Sink::Syslog);
        }
        let path = PathBuf::from(spec);
        let (file, ino) = open_append(&path)?;
        Ok(Sink::File { path, file, ino })
    }

    pub fn write(&mut self, line: &str) -> Result<()> {
        match self {
            Sink::File { path, file, ino } => {
                let current = std::fs::metadata(&*path).map(|m| m.ino()).ok();
                if current != Some(*ino) {
                    (*file, *ino) = open_append(path)?;
                }
                file.write_all(format!("{line}\n").as_bytes())
                    .with_context(|| format!("writing {}", path.display()))
            }
            Sink::Syslog => {
                // The file prefix is for files; syslog stamps its own.
                let msg = line.split_once(" [-] ").map_or(line, |(_, m)| m);
                let c = CString::new(msg.replace('\0', "")).expect("no NUL left");
                // SAFETY: a "%s" format with one C string argument.
                unsafe { libc::syslog(libc::LOG_INFO, c"%s".as_ptr(), c.as_ptr()) };
                Ok(())
            }
        }
    }
}

fn open_append(path: &PathBuf) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the security-group log {}", path.display()))?;
    let ino = file.metadata()?.ino();
    Ok((file, ino))
}
