//! Arbitrary text (lossy UTF-8) through the config parser: it must answer Ok or Err, never panic, and what it
//! accepts must render for `relay check`. The parser touches the file system only to check secret files it is
//! named (metadata, then an open of a regular file), and reads the host name and state-dir variables.
//!
//! It also checks that every listener timeout of an accepted config can be added to the clock, as
//! `smtp::connection` does (`Instant + command_timeout`): `command_timeout = "18446744073709551615s"` once passed
//! and panicked every connection's task; the config now bounds them.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use relay::config::Config;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    match Config::parse(&text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.to_toml();
            let _ = format!("{config:?}");
            let now = Instant::now();
            for l in &config.listeners {
                for d in [l.command_timeout, l.data_timeout, l.auth_failure_delay] {
                    assert!(now.checked_add(d).is_some(), "{d:?} cannot be added to the clock");
                }
            }
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            let _ = e.to_string();
        }
    }
});
