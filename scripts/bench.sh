#!/usr/bin/env bash
# make bench: mailgate (durable) beside Postfix's smtp-sink (no storage: the ceiling), with the
# same smtp-source command, plus end-of-DATA->250 latency from examples/loadgen.rs.
# Writes docs/BENCHMARKS.md. Benchmarks are measurements, never pass/fail tests.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-20}
MESSAGES=${MESSAGES:-20000}
SIZE=${SIZE:-4096}
RUNS=${RUNS:-3}
KEY=0123456789abcdef0123456789abcdef
RCPT="incoming+$KEY@localhost"
BIN=target/release/mailgate
LOADGEN=target/release/examples/loadgen
SRC=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)

# free_port, wait_port, now, rate, machine_desc, term_pids, source_cmd, benchdns_start, write_config
source scripts/lib-bench.sh

work=$(mktemp -d)
pids=()
cleanup() { term_pids; rm -rf "$work"; }
trap cleanup EXIT

median() { python3 -c "import statistics,sys; print(int(statistics.median([float(x) for x in sys.argv[1:]])))" "$@"; }

run_source() { # port -> msg/s
  local t0 t1
  t0=$(now); $(source_cmd "$SIZE" "$SESSIONS" "$MESSAGES" "$1") >/dev/null 2>&1; t1=$(now)
  rate "$MESSAGES" "$t0" "$t1"
}

# --- smtp-sink: the ceiling (no storage) ---
sink_port=$(free_port)
sink_user=$( [ "$(id -u)" = 0 ] && echo "-u nobody" || echo "")
$SINK $sink_user -c "127.0.0.1:$sink_port" 1000 >/dev/null 2>&1 &
pids+=($!); wait_port "$sink_port" 300
sink_rates=()
for _ in $(seq 1 "$RUNS"); do sink_rates+=("$(run_source "$sink_port")"); done
kill "${pids[-1]}" 2>/dev/null || true

# --- mailgate: durable (group commit + journal fdatasync before every 250) ---
mg_rates=(); lg_json=()
peak_rss=0
for run in $(seq 1 "$RUNS"); do
  smtp=$(free_port); http=$(free_port)
  dir="$work/run$run"; mkdir -p "$dir"
  write_config "$dir" "$smtp" "$http" off   # intake alone; authentication is measured below
  MAILGATE_LOG=warn $BIN serve --config "$dir/mailgate.toml" 2>"$dir/log" &
  pid=$!; pids+=($pid); wait_port "$smtp" 300
  mg_rates+=("$(run_source "$smtp")")
  lg_json+=("$($LOADGEN "127.0.0.1:$smtp" --sessions "$SESSIONS" --messages "$MESSAGES" --size "$SIZE")")
  rss=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
  kill -TERM "$pid"; wait "$pid" || true
done

# --- sender authentication: the same DKIM-signed load (From alice@bench.test), with
# SPF+DKIM+DMARC off and on; records served by a loopback DNS server (examples/benchdns.rs).
# Two signature algorithms: Ed25519 (the headline since the authentication issue) and RSA-2048
# (what nearly all real senders sign with), each with its own off/on pair.
BENCHDNS=target/release/examples/benchdns
benchdns_start "$work/dns.addr"
dns=$(head -1 "$work/dns.addr")
auth_run() { # off|on [ed25519|rsa2048] -> loadgen JSON
  local smtp http dir pid
  smtp=$(free_port); http=$(free_port); dir="$work/auth-$1-$RANDOM"; mkdir -p "$dir"
  write_config "$dir" "$smtp" "$http" "$([ "$1" = off ] && echo off || echo "$dns")"
  MAILGATE_LOG=warn $BIN serve --config "$dir/mailgate.toml" 2>"$dir/log" &
  pid=$!; pids+=($pid); wait_port "$smtp" 300
  $LOADGEN "127.0.0.1:$smtp" --sessions "$SESSIONS" --messages "$MESSAGES" --size "$SIZE" --from alice@bench.test --dkim "${2:-ed25519}"
  kill -TERM "$pid"; wait "$pid" || true
}
auth_off=(); auth_on=(); rsa_off=(); rsa_on=()
for _ in $(seq 1 "$RUNS"); do
  auth_off+=("$(auth_run off)"); auth_on+=("$(auth_run on)")
  rsa_off+=("$(auth_run off rsa2048)"); rsa_on+=("$(auth_run on rsa2048)")
done
auth_summary() { printf '%s\n' "$@" | python3 -c '
import json,sys,statistics
rows=[json.loads(l) for l in sys.stdin if l.strip()]
print("%d %.2f %.2f %d" % (statistics.median(r["per_second"] for r in rows), statistics.median(r["p50_ms"] for r in rows), statistics.median(r["p99_ms"] for r in rows), sum(r["errors"] for r in rows)))'; }
read -r off_rate off_p50 off_p99 off_err <<<"$(auth_summary "${auth_off[@]}")"
read -r on_rate on_p50 on_p99 on_err <<<"$(auth_summary "${auth_on[@]}")"
auth_ratio=$(python3 -c "print(f'{$on_rate/$off_rate:.2f}')")
read -r rsa_off_rate rsa_off_p50 rsa_off_p99 rsa_off_err <<<"$(auth_summary "${rsa_off[@]}")"
read -r rsa_on_rate rsa_on_p50 rsa_on_p99 rsa_on_err <<<"$(auth_summary "${rsa_on[@]}")"
rsa_ratio=$(python3 -c "print(f'{$rsa_on_rate/$rsa_off_rate:.2f}')")

sink_med=$(median "${sink_rates[@]}")
mg_med=$(median "${mg_rates[@]}")
lg_summary=$(printf '%s\n' "${lg_json[@]}" | python3 -c '
import json,sys,statistics
rows=[json.loads(l) for l in sys.stdin if l.strip()]
print("%d %.2f %.2f %d" % (statistics.median(r["per_second"] for r in rows), statistics.median(r["p50_ms"] for r in rows), statistics.median(r["p99_ms"] for r in rows), sum(r["errors"] for r in rows)))')
read -r lg_rate lg_p50 lg_p99 lg_err <<<"$lg_summary"
ratio=$(python3 -c "print(f'{$mg_med/$sink_med:.2f}')")

# --- through a private Postfix in mode A, beside Postfix -> discard: (root; its own section) ---
RUNS=$RUNS SESSIONS=$SESSIONS SIZE=$SIZE scripts/bench-postfix.sh > "$work/postfix.md" ||
  printf '## Through Postfix (mode A)\n\nNot measured: scripts/bench-postfix.sh failed (see its output above).\n' > "$work/postfix.md"

# --- the intake matrix: smtp-sink, Postfix -> discard:, mailgate auth off/on; 4 KiB and 100 KiB
# at 1, 20 and 50 sessions, the same smtp-source commands (its own section; one run per cell) ---
RUNS=${MATRIX_RUNS:-1} scripts/bench-matrix.sh > "$work/matrix.md" ||
  printf '## Intake matrix\n\nNot measured: scripts/bench-matrix.sh failed.\n' > "$work/matrix.md"

# --- push delivery ([[deliver]]) to a webhook receiver and to Sidekiq/Redis: its own section ---
SESSIONS=$SESSIONS SIZE=$SIZE scripts/bench-delivery.sh > "$work/delivery.md" ||
  printf '## Delivery\n\nNot measured: scripts/bench-delivery.sh failed.\n' > "$work/delivery.md"

machine=$(machine_desc)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` (scripts/bench.sh) on $(date -u +%Y-%m-%d). Every number is the median of $RUNS runs in the same invocation;"
  echo "both cores are shared by the load generator and the server, so compare the ratios, not the absolute numbers."
  echo
  echo "Machine: $machine; $(rustc --version)."
  echo
  echo "## Intake: $SESSIONS sessions, $MESSAGES messages of $SIZE bytes"
  echo
  echo "| server | storage | msg/s (smtp-source) | ratio to smtp-sink |"
  echo "|---|---|---|---|"
  echo "| Postfix smtp-sink | none (discards) | $sink_med | 1.00 |"
  echo "| mailgate serve | durable: group commit + journal fdatasync before every 250 | $mg_med | $ratio |"
  echo
  echo "End-of-DATA to 250 latency (examples/loadgen.rs, same load, pipelined MAIL/RCPT/DATA):"
  echo
  echo "| server | msg/s | p50 ms | p99 ms | errors | peak RSS |"
  echo "|---|---|---|---|---|---|"
  echo "| mailgate serve | $lg_rate | $lg_p50 | $lg_p99 | $lg_err | $((peak_rss/1024)) MiB |"
  echo
  echo "## Sender authentication: DKIM-signed $SIZE-byte messages, $SESSIONS sessions"
  echo
  echo "SPF + DKIM + DMARC on (\`spf = reject-fail\`, \`dkim = record\`, \`dmarc = enforce\`, records cached, served by"
  echo "examples/benchdns.rs on loopback) against all three off, same load (examples/loadgen.rs \`--dkim ed25519\`, then"
  echo "\`--dkim rsa2048\`, each with its own off/on pair). Target: ratio ≥ 0.70."
  echo
  echo "| signature | authentication | msg/s | p50 ms | p99 ms | errors | ratio |"
  echo "|---|---|---|---|---|---|---|"
  echo "| Ed25519 | off | $off_rate | $off_p50 | $off_p99 | $off_err | 1.00 |"
  echo "| Ed25519 | on | $on_rate | $on_p50 | $on_p99 | $on_err | $auth_ratio |"
  echo "| RSA-2048 | off | $rsa_off_rate | $rsa_off_p50 | $rsa_off_p99 | $rsa_off_err | 1.00 |"
  echo "| RSA-2048 | on | $rsa_on_rate | $rsa_on_p50 | $rsa_on_p99 | $rsa_on_err | $rsa_ratio |"
  echo
  echo "Commands:"
  echo
  echo '```'
  echo "$SINK $sink_user -c 127.0.0.1:PORT 1000"
  echo "$(source_cmd "$SIZE" "$SESSIONS" "$MESSAGES" PORT)"
  echo "$LOADGEN 127.0.0.1:PORT --sessions $SESSIONS --messages $MESSAGES --size $SIZE"
  echo "$LOADGEN 127.0.0.1:PORT --sessions $SESSIONS --messages $MESSAGES --size $SIZE --from alice@bench.test --dkim ed25519"
  echo "$LOADGEN 127.0.0.1:PORT --sessions $SESSIONS --messages $MESSAGES --size $SIZE --from alice@bench.test --dkim rsa2048"
  echo '```'
  echo
  echo "Raw runs: smtp-sink ${sink_rates[*]} msg/s; mailgate ${mg_rates[*]} msg/s."
  echo
  cat "$work/postfix.md"
  cat "$work/matrix.md"
  cat "$work/delivery.md"
  cat docs/bench-analysis.md
} > docs/BENCHMARKS.md
cat docs/BENCHMARKS.md
