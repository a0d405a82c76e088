//! Work on a slice of items split over a few scoped threads, for the jobs
//! too small for a pool: re-reading the chunks a migration round names,
//! writing the chunks a publish places.

/// The machine's cores, at least 1 and at most `max` (2 when unknown).
pub fn cores(max: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, max.max(1))
}

/// Threads for `items` items: [`cores`]`(max_threads)`, fewer when that
/// would give a thread under `min_per_thread` items, and at least one.
pub fn threads_for(items: usize, max_threads: usize, min_per_thread: usize) -> usize {
    threads_within(cores(max_threads), items, min_per_thread)
}

/// At most `cap` threads, none given under `min_per_thread` items, at least one.
fn threads_within(cap: usize, items: usize, min_per_thread: usize) -> usize {
    cap.min(items.div_ceil(min_per_thread.max(1))).max(1)
}

/// Applies `f` to every item on up to `max_threads` scoped threads (never
/// more than the machine's cores, each thread given at least
/// `min_per_thread` items, so a small slice gets one) and returns the
/// results in the items' order. Thread k of T takes items k, k + T, ...:
/// the items are done roughly in their order overall, so a caller that
/// lists them by urgency gets the urgent ones first (a publish places the
/// chunks the destination asks for first, first). The items of a thread
/// that panicked get `None`.
pub fn map_in_parts<T, R, F>(items: &[T], max_threads: usize, min_per_thread: usize, f: F) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    map_on(items, threads_for(items.len(), max_threads, min_per_thread), f)
}

/// [`map_in_parts`] for work that mostly waits on a device (reads that miss
/// every cache): up to `max_threads` threads whatever the cores, so one
/// thread's wait overlaps another's hashing and the device sees several
/// reads at once.
pub fn map_in_parts_waiting<T, R, F>(
    items: &[T],
    max_threads: usize,
    min_per_thread: usize,
    f: F,
) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    map_on(items, threads_within(max_threads, items.len(), min_per_thread), f)
}

fn map_on<T, R, F>(items: &[T], threads: usize, f: F) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    if items.is_empty() {
        return Vec::new();
    }
    let f = &f;
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|k| sc.spawn(move || items.iter().skip(k).step_by(threads).map(f).collect::<Vec<R>>()))
            .collect();
        let mut parts: Vec<Option<std::vec::IntoIter<R>>> = handles
            .into_iter()
            .map(|h| h.join().ok().map(Vec::into_iter))
            .collect();
        (0..items.len())
            .map(|i| parts[i % threads].as_mut().and_then(Iterator::next))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_respect_cores_caps_and_items_per_thread() {
        let c = cores(usize::MAX);
        assert!(c >= 1);
        assert_eq!(cores(1), 1);
        assert_eq!(cores(0), 1, "a cap of 0 still gives a thread");
        assert_eq!(threads_for(0, 8, 32), 1);
        assert_eq!(threads_for(31, 8, 32), 1, "under one thread's share: one");
        assert_eq!(threads_for(1000, 8, 32), c.min(8));
        assert_eq!(threads_for(64, 8, 32), c.min(2));
        assert_eq!(threads_for(3, 8, 0), c.min(3), "0 per thread counts as 1");
    }

    #[test]
    fn results_keep_the_items_order_and_a_panicked_part_is_none() {
        let items: Vec<u32> = (0..100).collect();
        let out = map_in_parts(&items, 4, 8, |&i| i * 2);
        assert_eq!(out, items.iter().map(|&i| Some(i * 2)).collect::<Vec<_>>());
        assert!(map_in_parts(&[] as &[u32], 4, 8, |&i| i).is_empty());
        // One thread (5 items, at least 8 per thread): its panic spoils all.
        let small: Vec<u32> = (0..5).collect();
        let out = map_in_parts(&small, 4, 8, |&i| {
            assert!(i != 3, "item 3 fails");
            i
        });
        assert_eq!(out, vec![None; 5]);
        // Several threads: a panic spoils only the items its thread took
        // (every T-th, from the panicking item's position modulo T).
        let t = threads_for(items.len(), 4, 8);
        let out = map_in_parts(&items, 4, 8, |&i| {
            assert!(i != 3, "item 3 fails");
            i
        });
        for (i, r) in out.iter().enumerate() {
            let spoiled = i % t == 3 % t;
            assert_eq!(r.is_none(), spoiled, "item {i} with {t} threads");
        }
    }

    #[test]
    fn waiting_work_gets_its_threads_whatever_the_cores() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};
        // Six items that each wait until all six run at once (or 5 s pass):
        // on a machine of fewer cores too, all six are in flight together.
        let active = AtomicUsize::new(0);
        let items: Vec<usize> = (0..6).collect();
        let seen = map_in_parts_waiting(&items, 8, 1, |&i| {
            active.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(5);
            while active.load(Ordering::SeqCst) < 6 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            (i, active.load(Ordering::SeqCst))
        });
        for (i, r) in seen.into_iter().enumerate() {
            assert_eq!(r, Some((i, 6)), "item {i}");
        }
        // The per-thread minimum still applies: 6 items, 3 per thread.
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        map_in_parts_waiting(&items, 8, 3, |_| {
            threads
                .lock()
                .map(|mut t| t.insert(std::thread::current().id()))
                .ok()
        });
        assert_eq!(threads.lock().map(|t| t.len()).ok(), Some(2));
        assert!(map_in_parts_waiting(&[] as &[u8], 8, 1, |_| 0).is_empty());
    }
}
