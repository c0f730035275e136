//! Arbitrary text (lossy UTF-8) through the config parser: it must answer Ok or Err, never panic, and what it
//! accepts must render for `relay check`. The parser touches the file system only to check secret files it is
//! named (metadata, then an open of a regular file), and reads the host name and state-dir variables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::config::Config;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    match Config::parse(&text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.to_toml();
            let _ = format!("{config:?}");
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.toml");
            let _ = e.to_string();
        }
    }
});
