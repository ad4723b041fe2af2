//! The authoritative page index: key -> page, in shards of hash maps under
//! mutexes. Every bound page is in it exactly once and every entry names a
//! page bound to that key (checked by `Vm::verify`). A key is bound or
//! unbound only with its shard locked, so a lookup under the shard lock
//! sees no key change in flight for that shard.

#![forbid(unsafe_code)]

use crate::hash::mix;
use crate::page::PageKey;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

/// Keys are already well spread by `mix`; hash with it, not SipHash.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix(v);
    }
}

pub(crate) type Shard = HashMap<u64, u32, BuildHasherDefault<KeyHasher>>;

pub(crate) struct PageIndex {
    shards: Box<[Mutex<Shard>]>,
}

pub(crate) const SHARDS: usize = 64;

impl PageIndex {
    pub fn new() -> PageIndex {
        PageIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard_of(key: PageKey) -> usize {
        (mix(key.raw()).rotate_left(17) as usize) % SHARDS
    }

    /// Lock the shard holding `key`. Poison is ignored: the maps are only
    /// changed by single inserts and removes.
    pub fn lock(&self, key: PageKey) -> MutexGuard<'_, Shard> {
        self.lock_shard(Self::shard_of(key))
    }

    pub fn lock_shard(&self, s: usize) -> MutexGuard<'_, Shard> {
        self.shards[s]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}
