//! How the process's allocator gives memory back.
//!
//! glibc's malloc serves a large block from its own mapping and unmaps it when freed, but only until the first
//! such block is freed: then it raises that threshold to the block's size (up to 32 MiB), and later blocks of the
//! size come from malloc's arenas, which keep them resident. A 19 MiB argon2 block per password check thus left
//! ~180 MiB held after a burst of logins (200 MiB peak with 20 first-time logins or 100 guessing clients;
//! `benches/memory.rs`). Fixing the threshold at 128 KiB, glibc's own default, turns that dynamic rise off: big
//! blocks (argon2's, message buffers) are mapped and given back each time, and the same bursts peak at ~50 MiB
//! and fall back to ~12 MiB. `MALLOC_ARENA_MAX` was measured too and made no difference (2) or made it worse (1).
//! A different allocator would mean C code built on every machine for the same effect.

/// Sets the allocator up as above. Called first thing by `relay serve`; harmless to call twice.
pub fn give_back_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}
