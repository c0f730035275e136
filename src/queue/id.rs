//! Queue ids: time-ordered (UUIDv7), so that a directory listing sorts roughly by arrival and an id says when
//! a message came in.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(uuid::Uuid);

impl QueueId {
    pub fn new() -> QueueId {
        QueueId(uuid::Uuid::now_v7())
    }

    /// Parses an id as printed by relay (32 hex digits). Anything else is refused, so an id taken from the
    /// command line can never name a path outside the queue.
    pub fn parse(s: &str) -> Option<QueueId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(QueueId)
    }

    /// When the id was made (when its message began to arrive), to the millisecond: the queue's ages come from
    /// file names, without opening the files.
    pub fn created_at(&self) -> std::time::SystemTime {
        let (secs, nanos) = self.0.get_timestamp().map_or((0, 0), |t| t.to_unix());
        std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos)
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl serde::Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        QueueId::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a queue id")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_paths() {
        let id = QueueId::new();
        assert_eq!(QueueId::parse(&id.to_string()), Some(id));
        assert_eq!(QueueId::parse("../../etc/passwd"), None);
        assert_eq!(QueueId::parse(""), None);
    }

    #[test]
    fn knows_when_it_was_made() {
        let before = std::time::SystemTime::now() - std::time::Duration::from_millis(1);
        let made = QueueId::new().created_at();
        assert!(
            made >= before && made <= std::time::SystemTime::now(),
            "{made:?}"
        );
    }
}
