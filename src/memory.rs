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
//!
//! Smaller blocks (a session's 64 KiB buffers, a message's first 128 KiB) come from the arenas, and a burst of
//! hundreds of sessions leaves them free but resident, scattered between live blocks that keep malloc from
//! trimming its heaps: 585 sessions at once left 82 MiB resident where 17 were in use. [`trim_now_and_then`]
//! hands such pages back (`malloc_trim`, which also releases free pages inside the heaps) once RSS is well above
//! its lowest and the arenas hold that much free.

/// Sets the allocator up as above. Called first thing by `relay serve`; harmless to call twice.
pub fn give_back_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// How often RSS is looked at, how far above its lowest level it must be, and how much the arenas must hold free,
/// to trim. 16 MiB for both kept a burst's remains for good when they were just under it: after a burst of 300
/// sessions a CI run's daemon (a debug build, which starts near 29 MiB) stayed at 45.9 MiB; relay's idle is
/// 9 MiB in a release build. A trim of a 50 MiB heap, half free in 64 KiB holes, took 0.3 ms here.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
const TRIM_ABOVE: u64 = 8 * 1024 * 1024;
const TRIM_FREE: u64 = 4 * 1024 * 1024;

/// Gives free arena pages back now and then, for as long as the daemon runs (see the module's header): when RSS
/// is well above the lowest level seen and the arenas hold a few MiB free (`mallinfo2`), so that memory a burst
/// still uses is not trimmed for nothing, and the burst's end is trimmed at the next look.
pub async fn trim_now_and_then() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let mut lowest: Option<u64> = None;
    let every = crate::test_hooks::duration("RELAY_TEST_TRIM_MS", TRIM_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // (Unreadable now and then, when descriptors run out: looked at again at the next tick.)
        let Some(now) = resident() else { continue };
        let floor = *lowest.get_or_insert(now);
        lowest = Some(floor.min(now));
        if now < floor.saturating_add(TRIM_ABOVE) {
            continue;
        }
        // Both walk every arena under its lock: off the runtime's threads.
        let trimmed = tokio::task::spawn_blocking(|| {
            if free_in_arenas() < TRIM_FREE {
                return None;
            }
            trim();
            resident()
        })
        .await;
        if let Ok(Some(after)) = trimmed {
            tracing::debug!(before = now, after, "free allocator pages given back");
            lowest = Some(floor.min(after));
        }
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes the allocator holds free in its arenas (every arena's, in glibc 2.33 and later).
fn free_in_arenas() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads malloc's statistics; it is thread-safe (it takes each arena's lock).
        let info = unsafe { libc::mallinfo2() };
        u64::try_from(info.fordblks).unwrap_or(u64::MAX)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// The process's resident set, in bytes.
fn resident() -> Option<u64> {
    // statm: size resident shared text lib data dt, in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}
