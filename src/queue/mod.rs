//! The durable queue. `layout` names the files, `file` is the format of one queued message, `spool` writes
//! messages in, `store` reads and manages them from outside the daemon, and delivery is `scheduler` (when) plus
//! `delivery` (one attempt), with `state` (per-message delivery state), `retry` (the trigger), `route` (which
//! account), `rate` (the providers' sending limits) and `pause` (a pause a provider asked for); `announce` tells
//! the scheduler of new mail, `seal` is a message's length and hash, `lane` runs the file work that ends each
//! attempt.

pub mod announce;
mod dead;
pub mod delivery;
mod envelope;
pub mod file;
mod id;
mod lane;
pub mod layout;
pub mod pause;
pub mod rate;
pub mod retry;
pub mod room;
pub mod route;
pub mod scheduler;
pub mod seal;
mod seeking;
mod spool;
pub mod state;
mod store;

pub use envelope::Envelope;
pub use file::{FileError, QueuedMessage};
pub use id::QueueId;
pub use layout::SpoolPaths;
pub use spool::{Incoming, Spool, SpoolError, relay_runs_on, while_no_relay_runs};
pub use store::{Place, QueueEntry, QueueStore, StoreError};

/// A lock that a panic elsewhere does not make unusable: what the queue's mutexes guard (maps of ids, counts, a
/// time) holds no invariant a panic could break halfway.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
