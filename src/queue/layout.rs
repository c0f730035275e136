//! Where queued mail lives under the state dir, and what its files are called. Every part of the queue (and the
//! command line) finds files through here, so the layout is written down once.

use std::path::{Path, PathBuf};

use super::QueueId;

/// The directories under the state dir that hold mail.
#[derive(Debug, Clone)]
pub struct SpoolPaths {
    /// Waiting for delivery: `ID.msg`, and `ID.state` once an attempt has failed.
    pub queue: PathBuf,
    /// Failed for good, kept with the last error.
    pub dead: PathBuf,
    /// Files relay could not read or whose seal did not match: kept for a person to look at, never delivered
    /// and never deleted by relay.
    pub quarantine: PathBuf,
}

impl SpoolPaths {
    pub fn new(state_dir: &Path) -> SpoolPaths {
        SpoolPaths {
            queue: state_dir.join("queue"),
            dead: state_dir.join("dead"),
            quarantine: state_dir.join("quarantine"),
        }
    }

    /// The state dir these live in.
    pub fn state_dir(&self) -> &Path {
        self.queue.parent().unwrap_or(Path::new("."))
    }
}

/// Where a message lives in `dir` (`queue/`, `dead/` or `quarantine/`).
pub fn msg_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.msg"))
}

/// A message's delivery state beside it in `dir`.
pub fn state_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.state"))
}

/// The queue id a file in a queue directory belongs to, and whether it is the message (`.msg`) or its state.
pub fn parse_file_name(path: &Path) -> Option<(QueueId, FileKind)> {
    let kind = match path.extension()?.to_str()? {
        "msg" => FileKind::Message,
        "state" => FileKind::State,
        _ => return None,
    };
    let stem = path.file_stem()?.to_str()?;
    let id = QueueId::parse(stem)?;
    // Only the name relay gives (lower case): another spelling of an id is a file relay would never find again
    // by its id, so it is not taken for that message.
    (id.to_string() == stem).then_some((id, kind))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Message,
    State,
}

/// The message and state files of a queue directory, by name, as the directory is read: nothing is held. An
/// error partway through is an item, so that a partial listing is never taken for the whole.
pub fn files(
    dir: &Path,
) -> std::io::Result<impl Iterator<Item = std::io::Result<(QueueId, FileKind)>>> {
    Ok(std::fs::read_dir(dir)?.filter_map(|entry| match entry {
        Ok(entry) => parse_file_name(Path::new(&entry.file_name())).map(Ok),
        Err(e) => Some(Err(e)),
    }))
}

/// Messages in a directory: counted as it is read, so that a backlog of any size costs no memory.
pub fn count_messages(dir: &Path) -> std::io::Result<u64> {
    let mut count = 0;
    for file in files(dir)? {
        if file?.1 == FileKind::Message {
            count += 1;
        }
    }
    Ok(count)
}

/// How many state files are held in memory at most while a directory is counted or scheduled (16 bytes each,
/// ≈ 2 MiB with the set's overhead). Past it, what is not held is asked of the file system, or assumed.
const STATES_HELD: usize = 65_536;

/// Which messages of a queue directory have a state file, for as many as [`STATES_HELD`].
pub struct States {
    held: std::collections::HashSet<QueueId>,
    /// State files beyond those held.
    beyond: u64,
}

impl States {
    pub fn read(dir: &Path) -> std::io::Result<States> {
        States::read_holding(dir, STATES_HELD)
    }

    fn read_holding(dir: &Path, most: usize) -> std::io::Result<States> {
        let mut states = States {
            held: std::collections::HashSet::new(),
            beyond: 0,
        };
        for file in files(dir)? {
            let (id, kind) = file?;
            if kind == FileKind::State {
                if states.held.len() < most {
                    states.held.insert(id);
                } else {
                    states.beyond += 1;
                }
            }
        }
        Ok(states)
    }

    /// False only when `id` certainly has no state file (when it was listed: one written since is not known).
    pub fn may_have(&self, id: QueueId) -> bool {
        self.beyond > 0 || self.held.contains(&id)
    }
}

/// A queue directory's messages, from file names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCount {
    pub messages: u64,
    /// Messages with a state file: at least one failed attempt.
    pub with_state: u64,
    /// The first queued (ids are time-ordered).
    pub oldest: Option<QueueId>,
}

/// Counts `queue/` in memory that does not grow with it: the directory is read twice, once for its state
/// files (at most [`STATES_HELD`] held) and once for its messages. A state file not held is counted as
/// having its message: one without lives only between the two unlinks of a delivery or deletion, and the
/// start-up recovery removes any left.
pub fn count_queue(dir: &Path) -> std::io::Result<QueueCount> {
    count_queue_holding(dir, STATES_HELD)
}

fn count_queue_holding(dir: &Path, most: usize) -> std::io::Result<QueueCount> {
    let mut states = States::read_holding(dir, most)?;
    let mut count = QueueCount::default();
    for file in files(dir)? {
        let (id, kind) = file?;
        if kind == FileKind::Message {
            count.messages += 1;
            count.oldest = Some(count.oldest.map_or(id, |o| o.min(id)));
            if states.held.remove(&id) {
                count.with_state += 1;
            }
        }
    }
    count.with_state = (count.with_state + states.beyond).min(count.messages);
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hold_at_most_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |name: String| std::fs::write(dir.path().join(name), b"").unwrap();
        let ids: Vec<QueueId> = (0..6).map(|_| QueueId::new()).collect();
        for id in &ids {
            touch(format!("{id}.msg"));
        }
        for id in &ids[..3] {
            touch(format!("{id}.state"));
        }
        touch(format!("{}.state", QueueId::new())); // its message is gone
        touch(".x.tmp".into());
        let exact = QueueCount {
            messages: 6,
            with_state: 3,
            oldest: Some(ids[0]),
        };
        assert_eq!(count_queue(dir.path()).unwrap(), exact);
        assert_eq!(count_queue_holding(dir.path(), 4).unwrap(), exact);
        // Past the bound, a state file not held is taken to have its message: off by at most the leftovers.
        let held_two = count_queue_holding(dir.path(), 2).unwrap();
        assert_eq!((held_two.messages, held_two.oldest), (6, Some(ids[0])));
        assert!((3..=4).contains(&held_two.with_state), "{held_two:?}");
        // Every message that has a state file may have one; past the bound, any may.
        let states = States::read_holding(dir.path(), 8).unwrap();
        assert!(ids[..3].iter().all(|id| states.may_have(*id)));
        assert!(!ids[3..].iter().any(|id| states.may_have(*id)));
        assert!(
            States::read_holding(dir.path(), 2)
                .unwrap()
                .may_have(ids[5])
        );
        assert_eq!(count_messages(dir.path()).unwrap(), 6);
    }
}
