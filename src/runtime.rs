//! The daemon's async runtime: how many worker threads it gets.
//!
//! The queue's committer is a thread of its own that writes and flushes every accepted message (`queue/spool.rs`),
//! and on loopback or the LAN the kernel's share of each message (the replies' sends, file creation, writeback)
//! is as large as relay's. So the runtime gets one worker fewer than there are cores, leaving one for the
//! committer and the kernel, instead of tokio's one per core. Measured on the 2-core development VM (one worker
//! against two, alternating rounds; BENCHMARKS.md): accepting at 1 session +11–17%, at 20 sessions +5–12% with
//! 7–20% less CPU per message; a backlog's drain into a local sink about 6% slower in one set (delivery to
//! Microsoft or Google waits on their round trips, not on relay's CPU). `TOKIO_WORKER_THREADS` in the environment still decides, for a
//! sysadmin who measures otherwise.

/// More would only fail later, less clearly: tokio aborts on the allocation or cannot spawn the threads
/// (systemd's `TasksMax`).
const MAX_WORKERS: usize = 256;

/// Builds the runtime `relay serve` runs on.
pub fn for_daemon() -> std::io::Result<tokio::runtime::Runtime> {
    // Read here rather than left to tokio, which panics on a value it cannot parse.
    let set = std::env::var_os("TOKIO_WORKER_THREADS");
    let workers = match set
        .as_ref()
        .map(|v| v.to_str().and_then(|v| v.trim().parse().ok()))
    {
        Some(Some(n)) if (1..=MAX_WORKERS).contains(&n) => n,
        Some(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "TOKIO_WORKER_THREADS in the environment is not a number of threads from 1 to {MAX_WORKERS}"
                ),
            ));
        }
        None => workers(std::thread::available_parallelism().map_or(1, usize::from)),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// Runs `f`, which may wait on the disk (an fsync, a rename) or on another process (a lock `relay authorize`
/// holds), without holding up the daemon: its runtime has a single worker on two cores, and every SMTP session
/// would wait with it. For rare, short work inside an async function that cannot simply be moved to
/// `spawn_blocking` (a token save holds the account's async lock around it). Where there is no multi-threaded
/// runtime (the CLI's current-thread one, a plain thread, the blocking pool) `f` just runs.
pub fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn workers(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_core_is_left_to_the_committer_and_the_kernel() {
        assert_eq!(super::workers(1), 1);
        assert_eq!(super::workers(2), 1);
        assert_eq!(super::workers(8), 7);
    }
}
