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
    cores(max_threads)
        .min(items.div_ceil(min_per_thread.max(1)))
        .max(1)
}

/// Applies `f` to every item on up to `max_threads` scoped threads (never
/// more than the machine's cores, each thread given at least
/// `min_per_thread` items, so a small slice gets one) and returns the
/// results in the items' order. The items of a part whose thread panicked
/// get `None`.
pub fn map_in_parts<T, R, F>(items: &[T], max_threads: usize, min_per_thread: usize, f: F) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    if items.is_empty() {
        return Vec::new();
    }
    let per = items
        .len()
        .div_ceil(threads_for(items.len(), max_threads, min_per_thread));
    let f = &f;
    std::thread::scope(|sc| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| {
                (
                    part.len(),
                    sc.spawn(move || part.iter().map(f).collect::<Vec<R>>()),
                )
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|(n, h)| match h.join() {
                Ok(out) => out.into_iter().map(Some).collect::<Vec<_>>(),
                Err(_) => (0..n).map(|_| None).collect(),
            })
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
    }
}
