//! Prints what a `server_core` input does, datagram by datagram:
//! `cargo run --manifest-path fuzz/Cargo.toml --example trace -- FILE...`
//! (a seed, or a crash reproducer from `fuzz/artifacts/server_core/`). A failing input panics
//! after printing the log up to the failure.

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        println!("== {path}");
        for line in udpmsg_fuzz::server_core::trace(&data) {
            println!("{line}");
        }
    }
}
