//! Imported password hashes are attacker-controlled: parsing (with its cost bounds) must
//! answer Ok or Err for any text, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    let _ = roster::crypto::formats::parse(data);
});
