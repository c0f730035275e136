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
//! hands such pages back (`malloc_trim`, which also releases free pages inside the heaps) once RSS has grown
//! well beyond what it was after the last trim.

/// Sets the allocator up as above. Called first thing by `relay serve`; harmless to call twice.
pub fn give_back_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// How often RSS is looked at, and how far above its lowest level it must be to trim.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
const TRIM_ABOVE: u64 = 16 * 1024 * 1024;

/// Gives free arena pages back now and then, for as long as the daemon runs (see the module's header). Compared
/// with the lowest level seen (at start, or after a trim): a trim in the middle of a burst gives little back,
/// and the level it leaves must not become the one the burst's end is compared with. Trims that give little back
/// (a working set grown for good: a large backlog) come less and less often, down to one in 16 ticks.
pub async fn trim_now_and_then() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let mut lowest: Option<u64> = None;
    // Ticks to let pass before the next trim, and how many have.
    let (mut spacing, mut since): (u32, u32) = (1, 0);
    let every = crate::test_hooks::duration("RELAY_TEST_TRIM_MS", TRIM_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        since = since.saturating_add(1);
        // (Unreadable now and then, when descriptors run out: looked at again at the next tick.)
        let Some(now) = resident() else { continue };
        let floor = *lowest.get_or_insert(now);
        lowest = Some(floor.min(now));
        if now < floor.saturating_add(TRIM_ABOVE) || since < spacing {
            continue;
        }
        since = 0;
        // Walks every arena under its lock: off the runtime's threads.
        let trimmed = tokio::task::spawn_blocking(|| {
            trim();
            resident()
        })
        .await;
        if let Ok(Some(after)) = trimmed {
            tracing::debug!(before = now, after, "free allocator pages given back");
            lowest = Some(floor.min(after));
            spacing = if now.saturating_sub(after) < TRIM_ABOVE / 16 {
                (spacing * 2).min(16)
            } else {
                1
            };
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

/// The process's resident set, in bytes.
fn resident() -> Option<u64> {
    // statm: size resident shared text lib data dt, in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}
