//! Memory given back to the operating system after a burst of sessions.
//!
//! A gateway that held 10,000 sessions and saw them end keeps, by default, the heap they used:
//! glibc's malloc returns to the kernel only the top of each arena, and what the sessions freed
//! lies in the middle, between allocations that live on. [`release`] asks the allocator to give
//! back every free page (`malloc_trim(0)` walks all arenas and `madvise`s whole free pages away),
//! so the process's RSS returns near its level before the burst. It costs a walk of the free
//! chunks and a page fault for each page used again, so the control plane calls it after many
//! sessions ended, not per session (`wsgate.engine.Relay`).

/// Gives free heap memory back to the operating system; true when some was. A no-op (false)
/// where the allocator has no such call (not glibc).
pub fn release() -> bool {
    trim()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    extern "C" {
        /// glibc: releases free memory at the top of the heap and, since 2.8, the free pages
        /// inside every arena; returns 1 if any was released.
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena in turn).
    unsafe { malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_freed_in_the_middle_of_the_heap_is_released() {
        // Many small blocks, every other one kept: the freed ones cannot merge into the top.
        let mut blocks: Vec<Vec<u8>> = (0..5_000).map(|i| vec![i as u8; 4000]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let released = release();
        assert!(kept.iter().all(|b| b.len() == 4000));
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "glibc had whole free pages to give back");
        }
    }
}
