//! Endpoint picking: pure functions over a view of a cluster's endpoints, so every policy is
//! tested without sockets. The caller supplies randomness and counters.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// What a picker knows about one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u32,
    /// Requests in flight to it.
    pub active: u32,
    /// Healthy and not ejected.
    pub available: bool,
}

/// Weighted round robin: the `counter`-th slot of the available endpoints' weights laid end to
/// end. Consecutive counters spread requests in proportion to weight.
pub fn round_robin(cands: &[Candidate], counter: u64) -> Option<usize> {
    let total: u64 = cands
        .iter()
        .filter(|c| c.available)
        .map(|c| u64::from(c.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut slot = counter % total;
    for (i, c) in cands.iter().enumerate().filter(|(_, c)| c.available) {
        let w = u64::from(c.weight);
        if slot < w {
            return Some(i);
        }
        slot -= w;
    }
    None
}

/// Power of two choices: two weighted-random available endpoints (from `roll_a`, `roll_b`), the
/// one with fewer active requests per unit of weight wins.
pub fn least_request(cands: &[Candidate], roll_a: u64, roll_b: u64) -> Option<usize> {
    let a = round_robin(cands, roll_a)?;
    let b = round_robin(cands, roll_b)?;
    // Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
    let load = |x: usize, y: usize| u64::from(cands[x].active) * u64::from(cands[y].weight.max(1));
    Some(if load(b, a) < load(a, b) { b } else { a })
}

/// A consistent-hash ring with points per endpoint in proportion to its weight.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

/// Points per unit of weight: enough that 3+ endpoints share keys within a few percent.
const POINTS_PER_WEIGHT: u32 = 160;

impl Ring {
    /// Builds the ring for endpoints with these weights and addresses (stable across restarts
    /// and reloads as long as the addresses are).
    pub fn new<A: Hash>(endpoints: &[(A, u32)]) -> Self {
        let mut points = Vec::new();
        for (i, (addr, w)) in endpoints.iter().enumerate() {
            for p in 0..w.saturating_mul(POINTS_PER_WEIGHT) {
                points.push((hash_of(&(addr, p)), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The endpoint owning `key_hash`: the first available one clockwise from it.
    pub fn pick(&self, key_hash: u64, cands: &[Candidate]) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(h, _)| *h < key_hash);
        let n = self.points.len();
        (0..n)
            .map(|k| self.points[(start + k) % n].1)
            .find(|i| cands.get(*i).is_some_and(|c| c.available))
    }
}

/// Hash used for ring keys and points.
pub fn hash_of<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(weight: u32, active: u32, available: bool) -> Candidate {
        Candidate {
            weight,
            active,
            available,
        }
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unavailable() {
        let cands = [c(2, 0, true), c(1, 0, false), c(1, 0, true)];
        let mut counts = [0; 3];
        for n in 0..300 {
            counts[round_robin(&cands, n).unwrap()] += 1;
        }
        assert_eq!(counts, [200, 0, 100]);
        assert_eq!(round_robin(&[c(1, 0, false)], 0), None);
        assert_eq!(round_robin(&[], 7), None);
    }

    #[test]
    fn least_request_prefers_less_loaded_of_two() {
        let cands = [c(1, 10, true), c(1, 1, true)];
        assert_eq!(least_request(&cands, 0, 1), Some(1));
        assert_eq!(least_request(&cands, 1, 0), Some(1));
        assert_eq!(least_request(&cands, 0, 0), Some(0));
        // Weight scales capacity: 4 active on weight 4 beats 2 active on weight 1.
        let weighted = [c(4, 4, true), c(1, 2, true)];
        assert_eq!(least_request(&weighted, 0, 4), Some(0));
        assert_eq!(least_request(&[c(1, 0, false)], 0, 0), None);
    }

    #[test]
    fn ring_is_stable_and_moves_only_keys_of_a_removed_endpoint() {
        let addrs = [("a", 1), ("b", 1), ("c", 1)];
        let ring = Ring::new(&addrs);
        let all = [c(1, 0, true); 3];
        let mut without_b = all;
        without_b[1].available = false;
        let mut counts = [0; 3];
        for key in 0..3000u32 {
            let h = hash_of(&key);
            let owner = ring.pick(h, &all).unwrap();
            counts[owner] += 1;
            assert_eq!(ring.pick(h, &all), Some(owner), "same key, same endpoint");
            let fallback = ring.pick(h, &without_b).unwrap();
            if owner != 1 {
                assert_eq!(fallback, owner, "keys of healthy endpoints stay put");
            } else {
                assert_ne!(fallback, 1);
            }
        }
        for n in counts {
            assert!((700..1300).contains(&n), "balanced: {counts:?}");
        }
    }
}
