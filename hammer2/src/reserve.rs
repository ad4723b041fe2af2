//! Space reserved by fallocate(2): the 64 KiB logical blocks of a file
//! whose next write is promised room. HAMMER2 has no preallocated
//! extents on disk (DragonFly does not implement fallocate), and on a
//! copy-on-write volume even overwriting a block needs a new one, so a
//! reservation is held in memory against the allocator's free space (the
//! mount's admission), block by block, until a write makes the block
//! pending (the reservation passes to it), the file shrinks below it, or
//! the inode goes. It does not survive an unmount.
//!
//! `BlockRanges` keeps the reserved block numbers as disjoint half-open
//! ranges, so a reservation of any size costs one entry.

use std::collections::BTreeMap;

/// A set of block numbers as disjoint, non-adjacent half-open ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRanges {
    /// start -> end (exclusive).
    ranges: BTreeMap<u64, u64>,
    count: u64,
}

impl BlockRanges {
    /// Blocks in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, b: u64) -> bool {
        self.ranges
            .range(..=b)
            .next_back()
            .is_some_and(|(_, &e)| b < e)
    }

    /// Blocks of `[start, end)` in the set.
    pub fn count_in(&self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let first = self
            .ranges
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        self.ranges
            .range(first..end)
            .map(|(&s, &e)| e.min(end).saturating_sub(s.max(start)))
            .sum()
    }

    /// Add `[start, end)`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Merge with every range that overlaps or touches.
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, &re)| re >= start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            self.ranges.remove(&rs);
            self.count -= re - rs;
            s = s.min(rs);
            e = e.max(re);
        }
        self.ranges.insert(s, e);
        self.count += e - s;
    }

    /// Remove `[start, end)`; returns how many blocks were in the set.
    pub fn remove(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &re)| re > start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        let mut removed = 0;
        for (rs, re) in overlapping {
            self.ranges.remove(&rs);
            self.count -= re - rs;
            removed += re.min(end) - rs.max(start);
            if rs < start {
                self.ranges.insert(rs, start);
                self.count += start - rs;
            }
            if re > end {
                self.ranges.insert(end, re);
                self.count += re - end;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    /// Against a plain set of block numbers.
    #[test]
    fn ranges_against_a_set() {
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut r = BlockRanges::default();
            let mut model = BTreeSet::new();
            for _ in 0..400 {
                let a = rng.gen_range(0..200u64);
                let b = a + rng.gen_range(0..30u64);
                if rng.gen_bool(0.55) {
                    r.insert(a, b);
                    model.extend(a..b);
                } else {
                    let want = (a..b).filter(|x| model.remove(x)).count() as u64;
                    assert_eq!(r.remove(a, b), want, "seed {seed}");
                }
                assert_eq!(r.len(), model.len() as u64, "seed {seed}");
                let (x, y) = (rng.gen_range(0..230u64), rng.gen_range(0..230u64));
                let (x, y) = (x.min(y), x.max(y));
                assert_eq!(
                    r.count_in(x, y),
                    model.range(x..y).count() as u64,
                    "seed {seed}"
                );
                let p = rng.gen_range(0..230u64);
                assert_eq!(r.contains(p), model.contains(&p), "seed {seed}");
                // Ranges stay disjoint and not adjacent.
                let v: Vec<(u64, u64)> = r.ranges.iter().map(|(&s, &e)| (s, e)).collect();
                assert!(v.iter().all(|(s, e)| s < e));
                assert!(v.windows(2).all(|w| w[0].1 < w[1].0), "seed {seed}: {v:?}");
            }
        }
    }
}
