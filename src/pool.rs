//! The worker pool for CPU-bound work off the async runtime: building a
//! generation's query index and packing its bodies.
//!
//! The threads live as long as the process, so a sync's index build and
//! packing run on threads whose allocator heaps are reused by the next
//! sync. A thread started per generation (as `std::thread::scope` did)
//! exits while what it allocated (the generation's postings and packed
//! bodies) is still alive; the allocator gives such an exited thread's
//! pages back only lazily, once that memory is freed elsewhere and another
//! thread reclaims them. On threads that never exit, nothing is left in
//! an abandoned heap.

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Most threads the pool uses, whatever the machine has: index builds
/// stop scaling past this and the async workers need the rest.
const MAX_THREADS: usize = 8;

fn pool() -> Option<&'static ThreadPool> {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let built = ThreadPoolBuilder::new()
            .num_threads(threads())
            .thread_name(|i| format!("catalog-worker-{i}"))
            .panic_handler(|_| {
                // The panic hook has reported it; the task's own guard
                // (the index slot's) records the failure.
            })
            .build();
        match built {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the worker pool; CPU-bound work falls back to the calling thread and rayon's global pool");
                None
            }
        }
    })
    .as_ref()
}

/// How many threads the pool runs (the machine's parallelism, 1 to 8).
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_THREADS)
}

/// Runs `work` (which may use rayon's parallel iterators) on the pool and
/// waits for it. Without a pool, `work` starts on the calling thread and
/// its parallel iterators fall back to rayon's global pool. A panic in
/// `work` propagates to the caller.
pub fn run<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// Starts `work` on the pool without waiting for it. Returns `false`, and
/// runs nothing, when there is no pool.
pub fn spawn(work: impl FnOnce() + Send + 'static) -> bool {
    match pool() {
        Some(pool) => {
            pool.spawn(work);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::mpsc;

    #[test]
    fn work_runs_on_named_threads_that_outlive_it() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let ran_on = run(|| {
                (0..64)
                    .into_par_iter()
                    .map(|_| {
                        let t = std::thread::current();
                        (t.id(), t.name().unwrap_or("").to_string())
                    })
                    .collect::<Vec<_>>()
            });
            for (id, name) in ran_on {
                assert!(name.starts_with("catalog-worker-"), "{name}");
                seen.insert(id);
            }
            let (tx, rx) = mpsc::channel();
            assert!(spawn(move || {
                let _ = tx.send(std::thread::current().id());
            }));
            seen.insert(rx.recv().unwrap());
        }
        // Twenty rounds of work ran on the same few threads: none was
        // started for a piece of work.
        assert!(
            seen.len() <= threads(),
            "{} threads for {} slots",
            seen.len(),
            threads()
        );
    }

    #[test]
    fn a_panic_in_spawned_work_leaves_the_pool_serving() {
        assert!(spawn(|| panic!("spawned work failed")));
        let (tx, rx) = mpsc::channel();
        assert!(spawn(move || {
            let _ = tx.send(41 + 1);
        }));
        assert_eq!(rx.recv().unwrap(), 42);
        assert_eq!(run(|| 7), 7);
    }
}
