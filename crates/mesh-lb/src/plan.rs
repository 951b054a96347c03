//! The map-update diff: from what a service's slots hold to the writes that make them hold the
//! desired backends, in an order that never shows a concurrent lookup a hole.
//!
//! The programs read `count` from the service, pick a slot below it, and look that slot up.
//! So at every moment each slot below the visible count must hold a backend (of the old or the
//! new set). The plan is, in this order (as documented in `ebpf/lb.h`):
//!
//! 1. overwrite the slots below `min(old, new)` whose backend goes away (or that are missing),
//!    with a backend that stays but sits at a slot `>= new` (it is moved down), or with an added
//!    one; each is one atomic element replace;
//! 2. when growing, write the slots `old..new`;
//! 3. write the service value (`count = new`, `rev + 1`), which also creates the service;
//! 4. when shrinking, delete the slots `new..old`.
//!
//! Backends that stay and already sit below the new count never move, so the cost is
//! O(changes): adding one backend is 2 writes, removing one at most 3, an unchanged list 0.

use std::collections::HashSet;
use std::hash::Hash;

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op<B> {
    /// `backends[slot] = backend`.
    Write { slot: u16, backend: B },
    /// `services[key] = { count, rev + 1 }` (creates the service if it is absent).
    SetCount { count: u16 },
    /// Delete `backends[slot]`.
    Delete { slot: u16 },
}

/// The plan from `current` (the service's slots `0..count` as the map holds them; `None` for a
/// slot that is missing; `current == None` when the service does not exist) to `desired`
/// (duplicates are ignored, the first occurrence wins). `desired` must have at most
/// `u16::MAX` distinct entries (the caller checks).
pub(crate) fn plan<B: Clone + Eq + Hash>(
    current: Option<&[Option<B>]>,
    desired: &[B],
) -> Vec<Op<B>> {
    let mut uniq = HashSet::with_capacity(desired.len());
    let desired: Vec<&B> = desired.iter().filter(|b| uniq.insert(*b)).collect();
    let exists = current.is_some();
    let current = current.unwrap_or(&[]);
    let (n, m) = (current.len(), desired.len());
    assert!(m <= usize::from(u16::MAX), "too many backends: {m}");

    // Backends that stay: at their slot when it is below the new count, else to be moved down.
    let mut target: Vec<Option<&B>> = vec![None; m];
    let mut kept = HashSet::with_capacity(n);
    let mut moved_down = Vec::new();
    for (slot, b) in current.iter().enumerate() {
        let Some(b) = b else { continue };
        if !uniq.contains(b) || !kept.insert(b) {
            continue; // removed, or a duplicate slot (healed like a removed one)
        }
        if slot < m {
            target[slot] = Some(b);
        } else {
            moved_down.push(b);
        }
    }
    let mut fillers = moved_down
        .into_iter()
        .chain(desired.iter().copied().filter(|b| !kept.contains(b)));
    for t in target.iter_mut().filter(|t| t.is_none()) {
        *t = fillers.next();
    }
    debug_assert!(fillers.next().is_none());

    let mut ops = Vec::new();
    for (slot, want) in target.iter().enumerate() {
        let want = want.expect("every slot below the new count is assigned");
        if current.get(slot).and_then(Option::as_ref) != Some(want) {
            ops.push(Op::Write {
                slot: slot as u16,
                backend: want.clone(),
            });
        }
    }
    // `target` is walked in slot order, so the in-place replacements (slots < n) already come
    // before the appends (slots >= n), as step 1 before step 2.
    if !ops.is_empty() || n != m || !exists {
        ops.push(Op::SetCount { count: m as u16 });
    }
    for (slot, b) in current.iter().enumerate().skip(m) {
        if b.is_some() {
            ops.push(Op::Delete { slot: slot as u16 });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    /// A simulated service: its count (None: absent) and its slots.
    #[derive(Clone, Debug, Default)]
    struct Sim {
        count: Option<u16>,
        slots: HashMap<u16, u32>,
    }

    impl Sim {
        fn from(backends: &[u32]) -> Sim {
            Sim {
                count: Some(backends.len() as u16),
                slots: backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (i as u16, *b))
                    .collect(),
            }
        }
        fn current(&self) -> Option<Vec<Option<u32>>> {
            self.count
                .map(|c| (0..c).map(|s| self.slots.get(&s).copied()).collect())
        }
        fn visible(&self) -> Vec<u32> {
            (0..self.count.unwrap_or(0))
                .map(|s| self.slots[&s])
                .collect()
        }
        fn apply(&mut self, op: &Op<u32>) {
            match op {
                Op::Write { slot, backend } => {
                    self.slots.insert(*slot, *backend);
                }
                Op::SetCount { count } => self.count = Some(*count),
                Op::Delete { slot } => {
                    self.slots.remove(slot);
                }
            }
        }
        /// What a concurrent lookup can see: every slot below count holds an allowed backend.
        fn check_no_hole(&self, allowed: &BTreeSet<u32>, when: &str) {
            for s in 0..self.count.unwrap_or(0) {
                let b = self
                    .slots
                    .get(&s)
                    .unwrap_or_else(|| panic!("{when}: hole at slot {s}"));
                assert!(
                    allowed.contains(b),
                    "{when}: slot {s} holds {b}, neither old nor new"
                );
            }
        }
    }

    /// Applies the plan from `old` to `new`, checking every intermediate state; returns the plan.
    fn run(old: &[u32], new: &[u32]) -> Vec<Op<u32>> {
        let mut sim = Sim::from(old);
        let ops = plan(sim.current().as_deref(), new);
        let allowed: BTreeSet<u32> = old.iter().chain(new).copied().collect();
        for (i, op) in ops.iter().enumerate() {
            sim.apply(op);
            sim.check_no_hole(&allowed, &format!("{old:?} -> {new:?} after op {i} {op:?}"));
        }
        let got: BTreeSet<u32> = sim.visible().into_iter().collect();
        let want: BTreeSet<u32> = new.iter().copied().collect();
        assert_eq!(got, want, "{old:?} -> {new:?}: {ops:?}");
        assert_eq!(
            sim.visible().len(),
            want.len(),
            "{old:?} -> {new:?}: duplicates"
        );
        assert!(
            sim.slots.keys().all(|s| *s < want.len() as u16),
            "{old:?} -> {new:?}: stale slots left {:?}",
            sim.slots
        );
        ops
    }

    fn writes(ops: &[Op<u32>]) -> usize {
        ops.len()
    }

    #[test]
    fn unchanged_is_free() {
        assert!(run(&[1, 2, 3], &[1, 2, 3]).is_empty());
        assert!(
            run(&[1, 2, 3], &[3, 1, 2]).is_empty(),
            "order does not matter"
        );
        assert!(
            run(&[1, 2, 3], &[3, 1, 2, 3, 1]).is_empty(),
            "duplicates ignored"
        );
        assert!(run(&[], &[]).is_empty());
    }

    #[test]
    fn add_one_is_write_then_count() {
        let ops = run(&[1, 2, 3], &[1, 2, 3, 4]);
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    slot: 3,
                    backend: 4
                },
                Op::SetCount { count: 4 }
            ]
        );
    }

    #[test]
    fn remove_one_moves_the_last_into_the_hole() {
        let ops = run(&[1, 2, 3, 4], &[1, 3, 4]);
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    slot: 1,
                    backend: 4
                },
                Op::SetCount { count: 3 },
                Op::Delete { slot: 3 },
            ]
        );
        let ops = run(&[1, 2, 3, 4], &[1, 2, 3]);
        assert_eq!(ops, vec![Op::SetCount { count: 3 }, Op::Delete { slot: 3 }]);
    }

    #[test]
    fn replace_is_one_write_in_place() {
        let ops = run(&[1, 2, 3], &[1, 5, 3]);
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    slot: 1,
                    backend: 5
                },
                Op::SetCount { count: 3 }
            ]
        );
    }

    #[test]
    fn new_service_writes_slots_before_the_count() {
        let ops = plan::<u32>(None, &[7, 8]);
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    slot: 0,
                    backend: 7
                },
                Op::Write {
                    slot: 1,
                    backend: 8
                },
                Op::SetCount { count: 2 },
            ]
        );
        assert_eq!(plan::<u32>(None, &[]), vec![Op::SetCount { count: 0 }]);
        assert_eq!(
            run(&[1, 2], &[]),
            vec![
                Op::SetCount { count: 0 },
                Op::Delete { slot: 0 },
                Op::Delete { slot: 1 }
            ]
        );
    }

    #[test]
    fn missing_and_duplicate_slots_are_healed() {
        // slot 1 missing, slot 2 duplicates slot 0: both refilled without touching slot 0.
        let current = vec![Some(1), None, Some(1), Some(4)];
        let ops = plan(Some(&current), &[1, 4, 5]);
        let mut sim = Sim {
            count: Some(4),
            slots: HashMap::new(),
        };
        for (s, b) in current.iter().enumerate() {
            if let Some(b) = b {
                sim.slots.insert(s as u16, *b);
            }
        }
        for op in &ops {
            sim.apply(op);
        }
        let got: BTreeSet<u32> = sim.visible().into_iter().collect();
        assert_eq!(got, BTreeSet::from([1, 4, 5]), "{ops:?}");
        assert!(!ops.contains(&Op::Write {
            slot: 0,
            backend: 1
        }));
    }

    /// Random old/new sets: no hole ever, exact result, and cost bounded by the change.
    #[test]
    fn random_diffs_never_show_a_hole_and_cost_what_changed() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..3000 {
            let universe = 1 + rand(40) as u32;
            let old: Vec<u32> = (0..universe).filter(|_| rand(2) == 0).collect();
            let mut new: Vec<u32> = (0..universe).filter(|_| rand(2) == 0).collect();
            // shuffle `new`: the order given must not matter for the cost
            for i in (1..new.len()).rev() {
                new.swap(i, rand(i as u64 + 1) as usize);
            }
            let ops = run(&old, &new);
            let o: BTreeSet<u32> = old.iter().copied().collect();
            let n: BTreeSet<u32> = new.iter().copied().collect();
            let added = n.difference(&o).count();
            let removed = o.difference(&n).count();
            assert!(
                writes(&ops) <= added + 2 * removed + 1,
                "{old:?} -> {new:?}: {} ops for +{added} -{removed}",
                ops.len()
            );
            if added + removed == 0 {
                assert!(ops.is_empty());
            }
        }
    }
}
