//! BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH for the LPM tries, and BPF_MAP_LOOKUP_BATCH
//! to read a whole map in a few syscalls (`/metrics`).
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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Reads every entry of a map with BPF_MAP_LOOKUP_BATCH, `chunk` entries per syscall, and
/// calls `f(key, value)` with the raw bytes of each; a per-CPU map's value is every possible
/// CPU's value, each rounded up to 8 bytes (`value_size` is the map's). Returns the number of
/// entries. A hash map is walked bucket by bucket, each bucket copied under its lock, so an
/// entry updated meanwhile is read whole, old or new; the walk holds no lock between
/// syscalls, so writers never wait for it.
pub fn lookup_all(
    map: &MapData,
    key_size: usize,
    value_size: usize,
    per_cpu: bool,
    mut chunk: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> io::Result<usize> {
    let value_size = if per_cpu {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        value_size.next_multiple_of(8) * cpus
    } else {
        value_size
    };
    let mut keys = vec![0u8; key_size * chunk];
    let mut values = vec![0u8; value_size * chunk];
    // The position between batches: a bucket number for hash maps, a key for the generic walk
    // (LPM tries, arrays).
    let mut token_in = vec![0u8; key_size.max(8)];
    let mut token_out = vec![0u8; key_size.max(8)];
    let mut first = true;
    let mut total = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` and `values` hold `chunk` keys and values of the map's sizes, the
        // tokens at least a key or a bucket number; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc != 0).then(io::Error::last_os_error);
        if err.as_ref().and_then(io::Error::raw_os_error) == Some(libc::ENOSPC) && attr.count == 0 {
            // One hash bucket holds more entries than a chunk: a bigger chunk, same position.
            chunk *= 2;
            keys.resize(key_size * chunk, 0);
            values.resize(value_size * chunk, 0);
            continue;
        }
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            f(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        total += n;
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Some(e) => return Err(e),
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}
