//! `Budget`, the time one query may spend evaluating: a deadline fixed when
//! the budget is made, checked cooperatively by every loop of the query
//! module (filters, predicates, `$contains` scans, sorting, facets, full
//! text, rendering) and by the index's sort-column builds. A leaf beside
//! `error`: the index may use it without an import cycle. An exceeded budget
//! is `QueryError::Budget`; nothing partial is ever returned.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use super::error::QueryError;

/// How long a query may evaluate. `Copy`, so a rendering moved to another
/// task keeps the same deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// When evaluation must stop; `None` never stops.
    deadline: Option<Instant>,
    /// The configured limit, for the error message.
    limit: Duration,
}

impl Budget {
    /// A budget of `limit` from now. Make it when evaluation starts (after
    /// any wait for the query index), since the clock runs from here.
    pub fn new(limit: Duration) -> Self {
        Budget {
            // A limit too far away to represent never stops.
            deadline: Instant::now().checked_add(limit),
            limit,
        }
    }

    /// What is left of a budget of `limit` of which `remaining` is unspent,
    /// from now (a streamed rendering resumes with what it has left; the
    /// error still names the configured limit).
    pub fn with_remaining(limit: Duration, remaining: Duration) -> Self {
        Budget {
            deadline: Instant::now().checked_add(remaining),
            limit,
        }
    }

    /// A budget that never runs out (tests, tools, internal callers).
    pub fn unlimited() -> Self {
        Budget {
            deadline: None,
            limit: Duration::MAX,
        }
    }

    /// The configured limit (`Duration::MAX` when unlimited).
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// `Err(QueryError::Budget)` once the deadline has passed. One clock
    /// read: cheap enough for every node and every few hundred documents.
    pub fn check(&self) -> Result<(), QueryError> {
        match self.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                Err(QueryError::Budget { limit: self.limit })
            }
            _ => Ok(()),
        }
    }

    /// Sorts like `slice::sort_by` (stable), checking the budget every few
    /// thousand elements: runs of `SORT_RUN` are sorted, then merged
    /// pairwise. A spent budget returns the error with `items` in some
    /// order (callers discard them).
    pub fn sort_by<T: Copy>(
        &self,
        items: &mut Vec<T>,
        mut compare: impl FnMut(&T, &T) -> Ordering,
    ) -> Result<(), QueryError> {
        for run in items.chunks_mut(SORT_RUN) {
            self.check()?;
            run.sort_by(&mut compare);
        }
        let len = items.len();
        let mut width = SORT_RUN;
        let mut merged: Vec<T> = Vec::with_capacity(if len > SORT_RUN { len } else { 0 });
        while width < len {
            merged.clear();
            for start in (0..len).step_by(2 * width) {
                let middle = (start + width).min(len);
                let end = (start + 2 * width).min(len);
                let (mut left, mut right) = (start, middle);
                while left < middle && right < end {
                    if merged.len() % SORT_RUN == 0 {
                        self.check()?;
                    }
                    // Ties take the left run first: the sort stays stable.
                    if compare(&items[right], &items[left]) == Ordering::Less {
                        merged.push(items[right]);
                        right += 1;
                    } else {
                        merged.push(items[left]);
                        left += 1;
                    }
                }
                merged.extend_from_slice(&items[left..middle]);
                merged.extend_from_slice(&items[right..end]);
            }
            std::mem::swap(items, &mut merged);
            width *= 2;
        }
        Ok(())
    }
}

/// Elements sorted between budget checks.
const SORT_RUN: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_names_its_setting_and_an_unlimited_one_never_ends() {
        let spent = Budget::new(Duration::ZERO);
        let e = spent.check().unwrap_err();
        assert_eq!(
            e,
            QueryError::Budget {
                limit: Duration::ZERO
            }
        );
        let e = QueryError::Budget {
            limit: Duration::from_secs(1),
        };
        assert_eq!(
            e.to_string(),
            "Query evaluation stopped after 1s (proxy.query_budget); narrow the filter or ask for fewer entities per page"
        );
        assert!(Budget::new(Duration::from_secs(3600)).check().is_ok());
        assert!(Budget::new(Duration::MAX).check().is_ok());
        assert!(Budget::unlimited().check().is_ok());
        assert_eq!(Budget::unlimited().limit(), Duration::MAX);
    }

    #[test]
    fn the_checked_sort_is_a_stable_sort_and_stops_when_spent() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 40) as u32 % 1000
        };
        for len in [0, 1, 2, 4095, 4096, 4097, 9000, 20_000] {
            let items: Vec<(u32, usize)> = (0..len).map(|i| (next(), i)).collect();
            let mut want = items.clone();
            want.sort_by_key(|a| a.0);
            let mut got = items;
            Budget::unlimited()
                .sort_by(&mut got, |a, b| a.0.cmp(&b.0))
                .unwrap();
            assert_eq!(got, want, "{len}");
        }
        let mut items: Vec<u32> = (0..10_000).rev().collect();
        let e = Budget::new(Duration::ZERO)
            .sort_by(&mut items, u32::cmp)
            .unwrap_err();
        assert!(matches!(e, QueryError::Budget { .. }));
    }
}
