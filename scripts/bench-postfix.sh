#!/usr/bin/env bash
# make bench, through Postfix: a private Postfix (root; its own config and queue directories
# under a temp dir, loopback high port) delivering to `discard:`, beside the same Postfix
# delivering to mailgate in deployment mode A (policy service at RCPT, LMTP after the queue),
# with the same smtp-source load; plus the latency from the client's end of DATA (the 250 it
# gets from Postfix) to the job being visible in mailgate's queue (examples/loadgen.rs --times).
#
# Prints a markdown section on stdout (progress on stderr); scripts/bench.sh puts it into
# docs/BENCHMARKS.md. Standalone: `RUNS=1 scripts/bench-postfix.sh` after
# `cargo build --release --bin mailgate --example loadgen`. Measurements, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
RUNS=${RUNS:-3}
PF_MESSAGES=${PF_MESSAGES:-5000}          # per throughput run
# latency loads, SESSIONSxMESSAGES, one after the other on the same instances: the bench load
# first, then lighter ones (at most 10000 messages in all: GET /v1/jobs?limit=0 returns them)
PF_LAT_LOADS=${PF_LAT_LOADS:-"${SESSIONS}x2000 4x1000 1x1000"}
DOMAIN=mx.test
KEY=0123456789abcdef0123456789abcdef
RCPT="incoming+$KEY@$DOMAIN"
BIN=target/release/mailgate
LOADGEN=target/release/examples/loadgen
SRC=$(command -v smtp-source || echo /usr/sbin/smtp-source)
TIMEOUT=${PF_TIMEOUT:-300}                # seconds to wait for one run's delivery

if [ "$(id -u)" != 0 ]; then
  echo "## Through Postfix (mode A)"
  echo
  echo "Not measured: a private Postfix instance needs root (run \`make bench\` as root)."
  echo
  exit 0
fi

work=$(mktemp -d /tmp/mailgate-bench-postfix.XXXXXX)
chmod 755 "$work"   # Postfix's daemons (user postfix) must reach the queue and log paths
pf_dirs=()          # Postfix instances still running: stopped by PID in cleanup
pids=()             # mailgate processes still running

# log, free_port, wait_port, now, stop_pid, term_pids, wait_pids, source_cmd
source scripts/lib-bench.sh
# a private Postfix: alive, main_cf_common, pf_start, pf_stop, pf_stop_all, poll_discard
source scripts/lib-postfix.sh

# --- mailgate in mode A ---------------------------------------------------------------------

# mg_start DIR: writes DIR/mailgate.toml with free ports (sets SMTP/LMTP/POLICY/HTTP) and starts
# mailgate serve (sets mg_pid).
mg_start() {
  local d=$1
  SMTP=$(free_port); LMTP=$(free_port); POLICY=$(free_port); HTTP=$(free_port)
  mkdir -p "$d"
  cat > "$d/mailgate.toml" <<TOML
[server]
hostname = "$DOMAIN"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:$SMTP"
mode = "in-session"
[[listen]]
protocol = "lmtp"
address = "127.0.0.1:$LMTP"
mode = "after-queue"
[[listen]]
protocol = "policy"
address = "127.0.0.1:$POLICY"
[[mailbox]]
name = "incoming"
address = "incoming+%{key}@$DOMAIN"
[limits]
max_connections_per_ip = 1000
[spool]
dir = "$d/spool"
[http]
listen = "127.0.0.1:$HTTP"
[auth]
spf = "off"
dkim = "off"
dmarc = "off"
TOML
  MAILGATE_LOG=warn $BIN serve --config "$d/mailgate.toml" 2>"$d/mailgate.log" &
  mg_pid=$!
  pids+=("$mg_pid")
  wait_port "$LMTP"; wait_port "$POLICY"; wait_port "$HTTP"
}

cleanup() {
  term_pids
  pf_stop_all
  wait_pids
  rm -rf "$work"
}
trap cleanup EXIT

# --- completion pollers: print the unix time at which all N messages were delivered ---------
# (poll_discard, for Postfix -> discard:, is in scripts/lib-postfix.sh)

# poll_ready PORT N: GET /v1/stats until N jobs are ready
poll_ready() {
  python3 - "$1" "$2" "$TIMEOUT" <<'PY'
import sys, time, json, urllib.request
url, n, limit = f"http://127.0.0.1:{sys.argv[1]}/v1/stats", int(sys.argv[2]), float(sys.argv[3])
ready, end = 0, time.time() + limit
while time.time() < end:
    ready = json.load(urllib.request.urlopen(url))["ready"]
    if ready >= n:
        print(f"{time.time():.6f} {ready}"); sys.exit(0)
    time.sleep(0.02)
print(f"nan {ready}"); sys.exit(1)
PY
}

# timed_source PORT POLLER ARGS...: runs smtp-source with the poller in the background;
# prints "delivered_msg_per_s accepted_msg_per_s" (delivery: start of smtp-source to the
# poller's completion time; accepted: smtp-source's own run time).
timed_source() {
  local port=$1 poller=$2 out t0 t1 done_at
  shift 2
  out="$work/poll.$RANDOM"
  $poller "$@" > "$out" &
  local ppid=$!
  trap 'kill "$ppid" 2>/dev/null || true' EXIT   # this runs in a $(...) subshell: its own trap
  t0=$(now); $(source_cmd "$SIZE" "$SESSIONS" "$PF_MESSAGES" "$port") >/dev/null 2>&1; t1=$(now)
  wait "$ppid" || true
  done_at=$(cut -d' ' -f1 < "$out")
  python3 -c "
import math; t0,t1,td,n=$t0,$t1,float('$done_at'),$PF_MESSAGES
print(('nan' if math.isnan(td) else round(n/(td-t0))), round(n/(t1-t0)))"
}

# --- runs: discard and mode A alternate, so drift on this shared machine hits both ----------

# latency MESSAGE_TIMES JOBS_JSON -> "matched p50_ms p99_ms": per message, the job's received_at
# minus the time the client got the 250 to its DATA, matched by Message-ID
latency() {
  python3 - "$1" "$2" <<'PY'
import sys, json, re, calendar
sent = {}
for line in open(sys.argv[1]):
    mid, t = line.rstrip("\n").split("\t")
    sent[mid] = float(t)
def unix(ts):  # RFC 3339, any number of fractional digits
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", ts)
    base = calendar.timegm(tuple(int(x) for x in re.split(r"[-T:]", m.group(1))) + (0, 0, 0))
    z = m.group(3)
    off = 0 if z == "Z" else (1 if z[0] == "+" else -1) * (int(z[1:3]) * 3600 + int(z[4:6]) * 60)
    return base + float("0." + (m.group(2) or "0")) - off
lat = []
for j in json.load(open(sys.argv[2])):
    mid = j["message"]["message_id"].strip("<>")
    if mid in sent:
        lat.append(unix(j["received_at"]) - sent[mid])
lat.sort()
if not lat:
    print(0, "nan", "nan"); sys.exit()
pct = lambda p: lat[min(int(len(lat) * p), len(lat) - 1)] * 1000
print(len(lat), f"{pct(0.50):.1f}", f"{pct(0.99):.1f}")
PY
}

MODE_A_CF="transport_maps = inline:{ $DOMAIN=lmtp:inet:127.0.0.1:LMTP }
lmtp_send_xforward_command = yes
smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service inet:127.0.0.1:POLICY"
mode_a_cf() { echo "$MODE_A_CF" | sed "s/:LMTP /:$LMTP /; s/:POLICY\$/:$POLICY/"; }

discard_rates=(); discard_acc=(); modea_rates=(); modea_acc=()
declare -A lat_raw   # load -> "p50/p99 (matched; loadgen msg/s, end of DATA->250 p50/p99)" per run
declare -A lat_p50s lat_p99s lat_rates
for run in $(seq 1 "$RUNS"); do
  # 1. Postfix -> discard:
  d="$work/discard$run"; port=$(free_port)
  pf_start "$d" "$port" "transport_maps = inline:{ $DOMAIN=discard: }
smtpd_recipient_restrictions = reject_unauth_destination"
  read -r r a <<<"$(timed_source "$port" poll_discard "$d/postfix.log" "$PF_MESSAGES")"
  discard_rates+=("$r"); discard_acc+=("$a")
  log "run $run: Postfix->discard $r msg/s delivered ($a msg/s accepted)"
  pf_stop "$d"; rm -rf "$d"

  # 2. mode A: Postfix -> policy service + LMTP -> mailgate
  d="$work/modea$run"; mg_start "$d/mg"; port=$(free_port)
  pf_start "$d/pf" "$port" "$(mode_a_cf)"
  read -r r a <<<"$(timed_source "$port" poll_ready "$HTTP" "$PF_MESSAGES")"
  modea_rates+=("$r"); modea_acc+=("$a")
  log "run $run: mode A $r msg/s into mailgate's queue ($a msg/s accepted by Postfix)"
  pf_stop "$d/pf"; stop_pid "$mg_pid"; rm -rf "$d"

  # 3. latency: examples/loadgen.rs through Postfix in mode A, fresh instances, the loads in turn
  d="$work/lat$run"; mg_start "$d/mg"; port=$(free_port)
  pf_start "$d/pf" "$port" "$(mode_a_cf)"
  total=0
  for load in $PF_LAT_LOADS; do
    s=${load%x*}; n=${load#*x}; total=$((total + n))
    lg=$($LOADGEN "127.0.0.1:$port" --sessions "$s" --messages "$n" --size "$SIZE" \
      --from a@example.org --rcpt "$RCPT" --times "$d/times-$load.tsv")
    poll_ready "$HTTP" "$total" >/dev/null || log "run $run: not all $total jobs arrived"
    echo "$lg" > "$d/loadgen-$load.json"
  done
  curl -sf "http://127.0.0.1:$HTTP/v1/jobs?limit=0" > "$d/jobs.json"
  for load in $PF_LAT_LOADS; do
    read -r n p50 p99 <<<"$(latency "$d/times-$load.tsv" "$d/jobs.json")"
    read -r lrate lp50 lp99 <<<"$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['per_second'], f\"{r['p50_ms']:.1f}\", f\"{r['p99_ms']:.1f}\")" "$d/loadgen-$load.json")"
    lat_p50s[$load]+="$p50 "; lat_p99s[$load]+="$p99 "; lat_rates[$load]+="$lrate "
    lat_raw[$load]+="$p50/$p99 ($n; $lrate, $lp50/$lp99); "
    log "run $run: load $load: latency p50 $p50 ms, p99 $p99 ms over $n messages; Postfix accepted $lrate msg/s"
  done
  pf_stop "$d/pf"; stop_pid "$mg_pid"
  [ "$run" = "$RUNS" ] || rm -rf "$d"   # the last run's mailgate.toml is shown below
done

med_int() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:] if x!='nan']; print(round(statistics.median(v)) if v else 'n/a')" "$@"; }
med_f1() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:] if x!='nan']; print(f'{statistics.median(v):.1f}' if v else 'n/a')" "$@"; }

dis_med=$(med_int "${discard_rates[@]}")
a_med=$(med_int "${modea_rates[@]}")
ratio=$(python3 -c "print('n/a' if 'n/a' in ('$dis_med','$a_med') else f'{$a_med/$dis_med:.2f}')")
first_load=${PF_LAT_LOADS%% *}
# shellcheck disable=SC2086
{ p50_med=$(med_f1 ${lat_p50s[$first_load]}); p99_med=$(med_f1 ${lat_p99s[$first_load]}); }
pf_version=$(postconf -d mail_version 2>/dev/null | sed 's/.*= //')
mg_toml=$(sed -e "s/127.0.0.1:$SMTP\"/127.0.0.1:SMTP\"/; s/127.0.0.1:$LMTP\"/127.0.0.1:LMTP\"/; s/127.0.0.1:$POLICY\"/127.0.0.1:POLICY\"/; s/127.0.0.1:$HTTP\"/127.0.0.1:HTTP\"/; s|dir = \".*\"|dir = \"/tmp/DIR/spool\"|" "$work/lat$RUNS/mg/mailgate.toml")

cat <<EOF
## Through Postfix (mode A)

A private Postfix $pf_version (Debian package) receives the same load twice: once delivering to
\`discard:\` (Postfix still queues every message durably first), once in deployment mode A
(mailgate's policy service at RCPT, LMTP after the queue into mailgate's durable queue).
**Sender authentication is off** (\`spf\`/\`dkim\`/\`dmarc = "off"\`): this measures the path, not DNS.
$SESSIONS sessions, $SIZE-byte messages, median of $RUNS runs; the two setups alternate and every run
starts fresh instances. Targets (issue 4): mode A ≥ 0.80 of Postfix→discard, p50 < 20 ms.

| Postfix → \`discard:\` msg/s | mode A msg/s | ratio | p50 end of DATA → job | p99 |
|---|---|---|---|---|
| $dis_med | $a_med | **$ratio** | **$p50_med ms** | $p99_med ms |

- msg/s: $PF_MESSAGES messages (smtp-source) divided by the time from the start of smtp-source until
  Postfix's log has $PF_MESSAGES \`status=sent\` lines from \`discard\`, or until \`GET /v1/stats\` shows
  $PF_MESSAGES ready jobs. Postfix's own intake rate (smtp-source's run time) is in the raw runs.
- Latency: examples/loadgen.rs through Postfix in mode A. Per message, the job's \`received_at\`
  (from \`GET /v1/jobs?limit=0\`) minus the wall-clock time at which the client got the 250 to its
  DATA (\`loadgen --times\`), matched by Message-ID. \`received_at\` is stamped just before
  mailgate's group commit, so this leaves out the commit itself (under 1–2 ms). The table above
  is the bench load ($first_load: sessions x messages, fewer messages than the throughput runs so
  that one request returns every job); lighter loads follow on the same instances:

| load (sessions x messages) | Postfix accepted msg/s | p50 ms | p99 ms |
|---|---|---|---|
$(for load in $PF_LAT_LOADS; do
  # shellcheck disable=SC2086
  echo "| $load | $(med_int ${lat_rates[$load]}) | $(med_f1 ${lat_p50s[$load]}) | $(med_f1 ${lat_p99s[$load]}) |"
done)

Commands (PORT, LMTP, POLICY: free loopback ports of each run; FILE: a temp file):

\`\`\`
$(source_cmd "$SIZE" "$SESSIONS" "$PF_MESSAGES" PORT)
$(for load in $PF_LAT_LOADS; do echo "$LOADGEN 127.0.0.1:PORT --sessions ${load%x*} --messages ${load#*x} --size $SIZE --from a@example.org --rcpt $RCPT --times FILE"; done)
\`\`\`

Postfix: \`postfix -c DIR start-fg\` as root, stopped with \`postfix -c DIR stop\` and by PID. master.cf
is Debian's with the \`smtp inet\` service replaced by \`127.0.0.1:PORT inet n - n - - smtpd\`, then
\`postconf -F '*/*/chroot = n'\`. main.cf (the test client 127.0.0.1 is outside \`mynetworks\`,
so Postfix treats it like an Internet client), then the lines of each setup:

\`\`\`
$(main_cf_common /tmp/DIR)
# Postfix -> discard:
transport_maps = inline:{ $DOMAIN=discard: }
smtpd_recipient_restrictions = reject_unauth_destination
# mode A:
$MODE_A_CF
\`\`\`

mailgate (\`$BIN serve --config FILE\`):

\`\`\`toml
$mg_toml
\`\`\`

Raw runs:

- Postfix→discard, msg/s delivered (Postfix's intake): $(for i in "${!discard_rates[@]}"; do printf '%s (%s) ' "${discard_rates[$i]}" "${discard_acc[$i]}"; done)
- mode A, msg/s delivered (Postfix's intake): $(for i in "${!modea_rates[@]}"; do printf '%s (%s) ' "${modea_rates[$i]}" "${modea_acc[$i]}"; done)
$(for load in $PF_LAT_LOADS; do echo "- latency at $load, p50/p99 ms (messages matched; loadgen msg/s, end of DATA→250 p50/p99 ms): ${lat_raw[$load]%; }"; done)
EOF
