#!/usr/bin/env bash
# Measures Mosquitto 2.0 (Debian's package) on this machine, as BENCHMARKS.md documents in its
# Mosquitto section: a broker on 127.0.0.1 with persistence off and no per-client queue limit,
# N x `mosquitto_sub -q 1 -C M` on one topic, one `mosquitto_pub -q 1 -l` fed M lines of 64
# bytes. Time = start of the publisher to the exit of the last subscriber.
#
# The publisher's stdin stays open until every subscriber has exited: mosquitto_pub -l drops
# its queued (not yet acknowledged) QoS 1 messages when its input closes, so closing it right
# after the last line would lose messages and leave the subscribers waiting.
#
# Cases: 1 subscriber x 200,000 messages and 10 subscribers x 100,000 messages, RUNS runs each.
# Environment: RUNS (default 3), PORT (default 18830, the next free one is used if taken),
# TIMEOUT (seconds per run, default 120; a run that exceeds it is reported as failed).
set -euo pipefail

RUNS=${RUNS:-3}
PORT=${PORT:-18830}
TIMEOUT=${TIMEOUT:-120}

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    apt-get install -y mosquitto mosquitto-clients
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

tmp=$(mktemp -d)
broker_pid=""
cleanup() {
    # Anything a failed run left behind (subscribers, the publisher and its feeder).
    touch "$tmp/done" 2>/dev/null || true
    local leftover
    leftover=$(jobs -p | grep -vx "${broker_pid:-none}" || true)
    if [[ -n $leftover ]]; then
        # shellcheck disable=SC2086
        kill $leftover 2>/dev/null || true
    fi
    if [[ -n $broker_pid ]]; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 100); do
    port_in_use "$PORT" || break
    PORT=$((PORT + 1))
done
if port_in_use "$PORT"; then
    echo "no free port found" >&2
    exit 1
fi

echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "mosquitto: $(mosquitto -h | head -1)"
echo "nproc:     $(nproc)"
echo "cpu:       $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "port:      $PORT, runs: $RUNS, timeout: ${TIMEOUT}s"
echo

cat >"$tmp/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
EOF
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 50); do
    port_in_use "$PORT" && break
    sleep 0.1
done
if ! port_in_use "$PORT"; then
    echo "broker did not start:" >&2
    cat "$tmp/broker.log" >&2
    exit 1
fi

payload=$(printf '%064d' 0)   # 64 bytes per line

# run N M: prints one result line (and appends it to $tmp/results); returns 1 if the run failed.
run() {
    local n=$1 m=$2 pids=() pid failed=0 t0 t1 secs
    rm -f "$tmp/done"
    [[ -f $tmp/lines.$m ]] ||
        awk -v p="$payload" -v m="$m" 'BEGIN { for (i = 0; i < m; i++) print p }' >"$tmp/lines.$m"

    for _ in $(seq "$n"); do
        timeout "$TIMEOUT" mosquitto_sub -h 127.0.0.1 -p "$PORT" -t bench -q 1 -C "$m" >/dev/null &
        pids+=($!)
    done
    sleep 1   # let them subscribe

    t0=$(date +%s.%N)
    {
        cat "$tmp/lines.$m"
        # Keep stdin open until the subscribers are done (bounded by their timeout).
        while [[ ! -e $tmp/done ]]; do sleep 0.05; done
    } | timeout $((TIMEOUT + 10)) mosquitto_pub -h 127.0.0.1 -p "$PORT" -t bench -q 1 -l &
    local pub=$!

    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    t1=$(date +%s.%N)
    touch "$tmp/done"
    wait "$pub" || true

    if ((failed)); then
        printf '%11d %9d  FAILED (a subscriber timed out or failed)\n' "$n" "$m"
        return 1
    fi
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    awk -v n="$n" -v m="$m" -v s="$secs" \
        'BEGIN { printf "%11d %9d %8.3f %12.0f %13.0f\n", n, m, s, m / s, m / s * n }' |
        tee -a "$tmp/results"
}

median() {   # median of the numbers on stdin
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

results=()
for c in "1 200000" "10 100000"; do
    read -r n m <<<"$c"
    echo "subscribers  messages  seconds  published/s  deliveries/s"
    : >"$tmp/results"
    for _ in $(seq "$RUNS"); do
        run "$n" "$m" || true
    done
    ok=$(wc -l <"$tmp/results")
    pub_med=$(awk '{ print $4 }' "$tmp/results" | median)
    del_med=$(awk '{ print $5 }' "$tmp/results" | median)
    results+=("$(printf '%11d %9d  median of %d/%d runs: %s published/s, %s deliveries/s' \
        "$n" "$m" "$ok" "$RUNS" "$pub_med" "$del_med")")
    echo
done

echo "medians:"
printf '%s\n' "${results[@]}"
