//! Shared by the fuzz targets: a global allocator that meters what a call allocates, so a target
//! can assert that a parser commits no memory for a length a peer merely declares.
//!
//! libFuzzer runs one input at a time on one thread, and its own allocations go through C++
//! `malloc`, not through Rust's global allocator: what [`measure`] counts is the call's alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Wraps the system allocator and records every allocation made through it.
pub struct Meter;

static COUNT: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn record(size: usize) {
    COUNT.fetch_add(1, Relaxed);
    TOTAL.fetch_add(size, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the counters only observe sizes.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's layout is passed on as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: `ptr` and `layout` come from the caller, who got them from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Meter = Meter;

/// What one call allocated (reallocations count with their new size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    /// Allocations made.
    pub count: usize,
    /// Bytes requested, summed.
    pub total: usize,
    /// The largest single request, in bytes.
    pub largest: usize,
}

/// Runs `f` and returns its result with what it allocated.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    COUNT.store(0, Relaxed);
    TOTAL.store(0, Relaxed);
    LARGEST.store(0, Relaxed);
    let out = f();
    let seen = Allocated {
        count: COUNT.load(Relaxed),
        total: TOTAL.load(Relaxed),
        largest: LARGEST.load(Relaxed),
    };
    (out, seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_sees_what_a_call_allocates_and_nothing_else() {
        let (v, seen) = measure(|| vec![0u8; 1000]);
        assert_eq!((seen.count, seen.largest), (1, 1000));
        drop(v);
        let ((), seen) = measure(|| ());
        assert_eq!(seen, Allocated::default());
    }
}
