//! The durable queue: `spool` writes messages in, `store` reads and manages them.

mod envelope;
mod id;
pub mod route;
pub mod scheduler;
pub mod seal;
mod spool;
mod store;

pub use envelope::Envelope;
pub use id::QueueId;
pub use spool::{Incoming, Spool, SpoolError, SpoolPaths};
pub use store::{QueueStore, QueuedMessage, StoreError};
