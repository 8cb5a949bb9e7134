//! Fuzzing harnesses for udpmsg. The cargo-fuzz targets in `fuzz_targets/` are one-line wrappers
//! around these functions, so that the seed generator (`examples/gen_corpus.rs`) and the replay
//! test (`tests/replay.rs`, plain `cargo test`, no cargo-fuzz needed) use the same code.
//!
//! - [`codec`]: `decode_client` / `decode_server` never panic, and whatever decodes re-encodes
//!   to exactly the bytes it came from.
//! - [`server_core`]: datagrams from a few addresses into a [`udpmsg::server::Server`] on a
//!   virtual clock, with its invariants checked after every turn.
//! - [`seeds`]: real traffic, encoded with the library, as seed inputs for each target.

pub mod codec;
pub mod seeds;
pub mod server_core;

/// Whether a known, reported problem is to be tolerated: `UDPMSG_FUZZ_ALLOW` is a comma-separated
/// list of names (`noncanonical`, `ping-reflection`), read once. By default nothing is: every
/// target checks its full set of invariants.
pub fn allowed(name: &str) -> bool {
    static ALLOW: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALLOW
        .get_or_init(|| {
            std::env::var("UDPMSG_FUZZ_ALLOW")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|a| a == name)
}
