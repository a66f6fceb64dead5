//! BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH for the LPM tries.
//!
//! aya 0.14 has no batch API, and a syscall per entry is most of the cost of writing a policy:
//! 20,000 SG_CLASSES entries took 49 ms one by one and 28 ms in one batch on this machine kind
//! (kernel 6.18; LPM tries have the kernel's generic batch operations). The kernel applies a
//! batch entry by entry, in order, and stops at the first failure, so a failed batch has the
//! same effect as the loop it replaces stopped at the same entry.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;
use bytemuck::Pod;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`, the member used by the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A failed batch: how many entries took effect before `error`.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: io::Error,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {} of the batch: {}", self.done, self.error)
    }
}

impl std::error::Error for BatchError {}

/// The LPM trie key layout (`struct bpf_lpm_trie_key_u8`): prefix length, then the data.
fn lpm_keys<K: Pod, V>(entries: &[(u32, K, V)]) -> Vec<u8> {
    let mut keys = Vec::with_capacity(entries.len() * (4 + size_of::<K>()));
    for (prefix, k, _) in entries {
        keys.extend_from_slice(&prefix.to_ne_bytes());
        keys.extend_from_slice(bytemuck::bytes_of(k));
    }
    keys
}

fn batch(
    map: &MapData,
    cmd: libc::c_long,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> Result<(), BatchError> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; `keys` and `values` hold
    // `count` entries of the map's key and value sizes and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    Err(BatchError {
        done: (attr.count as usize).min(count),
        error,
    })
}

/// Inserts or replaces `(prefix length, key, value)` entries of an LPM trie in one syscall.
pub fn lpm_update<K: Pod, V: Pod>(map: &MapData, entries: &[(u32, K, V)]) -> Result<(), BatchError> {
    let keys = lpm_keys(entries);
    let values: Vec<u8> = entries
        .iter()
        .flat_map(|(_, _, v)| bytemuck::bytes_of(v).iter().copied())
        .collect();
    batch(map, BPF_MAP_UPDATE_BATCH, &keys, Some(&values), entries.len())
}

/// Deletes LPM trie entries; entries already absent are skipped (the kernel stops a batch at a
/// missing key, so the rest is sent again). Returns how many were deleted.
pub fn lpm_delete<K: Pod, V>(map: &MapData, entries: &[(u32, K, V)]) -> Result<usize, BatchError> {
    let keys = lpm_keys(entries);
    let key_size = 4 + size_of::<K>();
    let mut from = 0;
    let mut deleted = 0;
    while from < entries.len() {
        match batch(
            map,
            BPF_MAP_DELETE_BATCH,
            &keys[from * key_size..],
            None,
            entries.len() - from,
        ) {
            Ok(()) => return Ok(deleted + entries.len() - from),
            Err(e) if e.error.raw_os_error() == Some(libc::ENOENT) => {
                deleted += e.done;
                from += e.done + 1;
            }
            Err(e) => {
                return Err(BatchError {
                    done: from + e.done,
                    error: e.error,
                });
            }
        }
    }
    Ok(deleted)
}
