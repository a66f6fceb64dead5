//! A longest-prefix-match table that behaves like the kernel's `BPF_MAP_TYPE_LPM_TRIE` as sg
//! uses it: keys are byte strings compared most significant bit first, an entry matches a
//! key when its first `prefix_len` bits are equal, and a lookup returns the entry with the
//! longest such prefix. Used to evaluate compiled maps in userspace exactly as the datapath
//! will, and reusable from any test that holds map entries.

use std::collections::HashMap;

/// Why an entry was refused. The kernel would accept both cases silently (the second write
/// replaces the first; bits past the prefix are ignored), which is exactly how a compiler bug
/// would hide, so the simulator is stricter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LpmError {
    PrefixTooLong {
        prefix_len: u32,
        key_bits: u32,
    },
    /// The key has bits set past `prefix_len`: the dump would not be canonical.
    DirtyKey {
        prefix_len: u32,
    },
    /// An entry with the same prefix is already present.
    Duplicate {
        prefix_len: u32,
    },
    WrongKeySize {
        expected: usize,
        got: usize,
    },
}

impl std::fmt::Display for LpmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for LpmError {}

#[derive(Clone, Debug)]
pub struct Lpm<V> {
    key_len: usize,
    /// Prefix lengths present, longest first.
    lens: Vec<u32>,
    entries: HashMap<(u32, Vec<u8>), V>,
}

/// `key` with every bit past `prefix_len` cleared.
pub fn mask(key: &[u8], prefix_len: u32) -> Vec<u8> {
    let mut out = key.to_vec();
    let full = (prefix_len / 8) as usize;
    let rest = prefix_len % 8;
    if full < out.len() {
        if rest != 0 {
            out[full] &= 0xffu8 << (8 - rest);
            out[full + 1..].fill(0);
        } else {
            out[full..].fill(0);
        }
    }
    out
}

impl<V> Lpm<V> {
    pub fn new(key_len: usize) -> Self {
        Lpm {
            key_len,
            lens: Vec::new(),
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, prefix_len: u32, key: &[u8], value: V) -> Result<(), LpmError> {
        if key.len() != self.key_len {
            return Err(LpmError::WrongKeySize {
                expected: self.key_len,
                got: key.len(),
            });
        }
        let key_bits = 8 * self.key_len as u32;
        if prefix_len > key_bits {
            return Err(LpmError::PrefixTooLong { prefix_len, key_bits });
        }
        let masked = mask(key, prefix_len);
        if masked != key {
            return Err(LpmError::DirtyKey { prefix_len });
        }
        if self.entries.contains_key(&(prefix_len, masked.clone())) {
            return Err(LpmError::Duplicate { prefix_len });
        }
        self.entries.insert((prefix_len, masked), value);
        if let Err(pos) = self.lens.binary_search_by(|l| prefix_len.cmp(l)) {
            self.lens.insert(pos, prefix_len);
        }
        Ok(())
    }

    /// The longest matching entry: its prefix length and value.
    pub fn lookup(&self, key: &[u8]) -> Option<(u32, &V)> {
        assert_eq!(key.len(), self.key_len, "lookup key size");
        self.lens
            .iter()
            .find_map(|&len| self.entries.get(&(len, mask(key, len))).map(|v| (len, v)))
    }

    /// Inserts Pod-keyed entries, as they would be written to the map.
    pub fn insert_pod<K: bytemuck::Pod>(
        &mut self,
        prefix_len: u32,
        key: &K,
        value: V,
    ) -> Result<(), LpmError> {
        self.insert(prefix_len, bytemuck::bytes_of(key), value)
    }

    pub fn lookup_pod<K: bytemuck::Pod>(&self, key: &K) -> Option<(u32, &V)> {
        self.lookup(bytemuck::bytes_of(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_msb_first() {
        let mut t = Lpm::new(2);
        t.insert(0, &[0, 0], "all").unwrap();
        t.insert(4, &[0xa0, 0], "a/4").unwrap();
        t.insert(12, &[0xab, 0xc0], "abc/12").unwrap();
        assert_eq!(t.lookup(&[0xab, 0xcd]), Some((12, &"abc/12")));
        assert_eq!(t.lookup(&[0xab, 0xdd]), Some((4, &"a/4")));
        assert_eq!(t.lookup(&[0x10, 0x00]), Some((0, &"all")));
        let mut u: Lpm<u8> = Lpm::new(2);
        u.insert(9, &[0x12, 0x80], 1).unwrap();
        assert_eq!(u.lookup(&[0x12, 0xff]), Some((9, &1)));
        assert_eq!(u.lookup(&[0x12, 0x7f]), None);
    }

    #[test]
    fn refuses_what_would_hide_bugs() {
        let mut t = Lpm::new(1);
        assert_eq!(t.insert(4, &[0xff], 0), Err(LpmError::DirtyKey { prefix_len: 4 }));
        t.insert(4, &[0xf0], 0).unwrap();
        assert_eq!(
            t.insert(4, &[0xf0], 1),
            Err(LpmError::Duplicate { prefix_len: 4 })
        );
        assert_eq!(
            t.insert(9, &[0], 1),
            Err(LpmError::PrefixTooLong {
                prefix_len: 9,
                key_bits: 8
            })
        );
        assert_eq!(
            t.insert(1, &[0, 0], 1),
            Err(LpmError::WrongKeySize { expected: 1, got: 2 })
        );
    }
}
