//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.
//! Each seed goes to `fuzz/corpus/<target>/seed-<name>`; stale `seed-*` files are removed, what
//! libFuzzer added beside them is left alone.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds = udpmsg_fuzz::seeds::all();
    for target in ["decode_client", "decode_server", "server_core"] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) {
                std::fs::remove_file(path)?;
            }
        }
    }
    for (target, name, bytes) in &seeds {
        std::fs::write(root.join(target).join(format!("seed-{name}")), bytes)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), root.display());
    Ok(())
}
