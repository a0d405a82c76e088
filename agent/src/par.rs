//! Work on a slice of items split over a few scoped threads, for the jobs
//! too small for a pool: re-reading the chunks a migration round names,
//! writing the chunks a publish places.

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
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, max_threads.max(1))
        .min(items.len().div_ceil(min_per_thread.max(1)))
        .max(1);
    let per = items.len().div_ceil(threads);
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
