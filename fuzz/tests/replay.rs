//! Runs without cargo-fuzz, on any toolchain: `cargo test --manifest-path fuzz/Cargo.toml`.
//! Every file in `fuzz/corpus/<target>/` (the committed seeds, and any crash reproducer saved
//! there as `seed-regress-*`) goes through its target; and the committed seeds are exactly what
//! `examples/gen_corpus.rs` writes.

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = corpus(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for (name, bytes) in files {
        if let Err(e) = std::panic::catch_unwind(|| run(&bytes)) {
            std::panic::resume_unwind(Box::new(format!("{target}/{name}: {e:?}")));
        }
    }
}

#[test]
fn decode_client_corpus() {
    replay("decode_client", udpmsg_fuzz::codec::decode_client);
}

#[test]
fn decode_server_corpus() {
    replay("decode_server", udpmsg_fuzz::codec::decode_server);
}

#[test]
fn server_core_corpus() {
    replay("server_core", udpmsg_fuzz::server_core::run);
}

#[test]
fn committed_seeds_are_the_generated_ones() {
    for (target, name, bytes) in udpmsg_fuzz::seeds::all() {
        let committed = corpus(target).into_iter().find(|(n, _)| *n == format!("seed-{name}"));
        assert_eq!(
            committed.map(|c| c.1).as_deref(),
            Some(&bytes[..]),
            "fuzz/corpus/{target}/seed-{name} is missing or stale: \
             cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus"
        );
    }
}
