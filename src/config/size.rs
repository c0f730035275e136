//! Byte sizes written the way sysadmins write them: `35MiB`, `10 MB`, `4096`.
//!
//! Hand-written because the few lines here give an error message that names the units we accept, and the
//! size crates we looked at either accept ambiguous forms (`35m`) or pull in more than this needs.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1000),
    ("KiB", 1 << 10),
    ("MB", 1000 * 1000),
    ("MiB", 1 << 20),
    ("GB", 1000 * 1000 * 1000),
    ("GiB", 1 << 30),
];

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a size (e.g. \"35MiB\", \"10MB\", \"4096\")"))?;
        let unit = unit.trim();
        let mult = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    format!("unknown unit `{unit}` in `{s}` (use B, KB, KiB, MB, MiB, GB or GiB)")
                })?
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in UNITS.iter().rev() {
            if *mult > 1 && self.0.is_multiple_of(*mult) && unit.contains('i') {
                return write!(f, "{}{}", self.0 / mult, unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("35MiB".parse::<ByteSize>().unwrap().0, 35 << 20);
        assert_eq!("10 MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("35m".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(35 << 20).to_string(), "35MiB");
    }
}
