#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time, on the stable toolchain.
#
#   ci/fuzz.sh                       # each target for 60 s
#   FUZZ_SECONDS=600 ci/fuzz.sh      # longer
#   FUZZ_TARGETS="server_core" ci/fuzz.sh
#   UDPMSG_FUZZ_ALLOW=noncanonical,ping-reflection ci/fuzz.sh   # tolerate known, reported issues
#   FUZZ_TARGET_DIR=~/.cache/udpmsg-fuzz ci/fuzz.sh   # keep the (slow) build outside the clone
#
# Installs cargo-fuzz (from crates.io) when it is missing; if that is impossible, prints
# "SKIPPED fuzzing: REASON" and exits 0. Builds the targets once without a sanitizer
# (`-s none`: stable Rust, and the crate has no unsafe code of its own), then fuzzes each one
# starting from the committed seeds (fuzz/corpus/TARGET, read only) plus what earlier runs on
# this machine found (fuzz/target/finds/TARGET). Exits 1 if any target crashed, timed out or ran
# out of memory; the reproducer is in fuzz/artifacts/TARGET/ and the log says how to replay it.
set -euo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-fuzz/target}

log() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() {
    echo "SKIPPED fuzzing: $*"
    exit 0
}

case $FUZZ_SECONDS in '' | *[!0-9]*) echo "FUZZ_SECONDS must be a number of seconds" >&2; exit 2 ;; esac
command -v cargo >/dev/null 2>&1 || skip "no cargo on PATH"
# libfuzzer-sys compiles libFuzzer itself (C++).
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 ||
    skip "no C++ compiler to build libFuzzer with (apt-get install g++)"

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    t=$SECONDS
    install_log=$(mktemp)
    if ! timeout 1200 cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION" >"$install_log" 2>&1; then
        tail -n 20 "$install_log" >&2 || true
        rm -f "$install_log"
        skip "cannot install cargo-fuzz $CARGO_FUZZ_VERSION (cargo install failed)"
    fi
    rm -f "$install_log"
    cargo fuzz --version >/dev/null 2>&1 || skip "cargo-fuzz installed but \`cargo fuzz\` does not run (is ~/.cargo/bin on PATH?)"
    log "installed $(cargo fuzz --version) in $((SECONDS - t)) s"
fi

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
[ -n "$targets" ] || { echo "no fuzz targets found" >&2; exit 2; }

log "building the targets ($(rustc --version), no sanitizer)"
t=$SECONDS
cargo fuzz build -s none --target-dir "$FUZZ_TARGET_DIR"
log "built in $((SECONDS - t)) s"

failed=()
for target in $targets; do
    [ -d "fuzz/corpus/$target" ] || { echo "no seed corpus fuzz/corpus/$target" >&2; exit 2; }
    finds=fuzz/target/finds/$target
    mkdir -p "$finds" "fuzz/artifacts/$target"
    log "$target: ${FUZZ_SECONDS} s"
    t=$SECONDS
    stamp=fuzz/target/$target.started
    touch "$stamp"
    # New inputs go to the first corpus directory only: the committed seeds stay as they are.
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or a blow-up.
    if timeout $((FUZZ_SECONDS + 300)) cargo fuzz run -s none --target-dir "$FUZZ_TARGET_DIR" "$target" "$finds" "fuzz/corpus/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"fuzz/target/$target.log" 2>&1; then
        log "$target: ok after $((SECONDS - t)) s: $(grep -E '^Done [0-9]+ runs' "fuzz/target/$target.log" || true)"
    else
        failed+=("$target")
        echo "---- $target FAILED after $((SECONDS - t)) s (whole log: fuzz/target/$target.log):" >&2
        grep -m 1 -A 12 -E 'panicked at' "fuzz/target/$target.log" >&2 || true
        grep -E 'ERROR: libFuzzer|SUMMARY|Test unit written' "fuzz/target/$target.log" >&2 || true
        grep -q -E 'ERROR: libFuzzer|panicked at' "fuzz/target/$target.log" || tail -n 30 "fuzz/target/$target.log" >&2
        find "fuzz/artifacts/$target" -type f -newer "$stamp" | while read -r f; do
            echo "reproduce: cargo fuzz run -s none $target $f" >&2
            if [ "$target" = server_core ]; then
                echo "  what it does: cargo run --manifest-path fuzz/Cargo.toml --example trace -- $f" >&2
            fi
        done
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing FAILED: ${failed[*]}" >&2
    exit 1
fi
log "all targets ran ${FUZZ_SECONDS} s without a failure: ${targets//$'\n'/ }"
