//! The VM page layer: a frame arena with one page structure per frame,
//! wire/hold/busy state, page queues, a pageout daemon and a lockless page
//! hash. It knows nothing of files or HAMMER2.
