#!/usr/bin/env bash
# make bench, delivery: mailgate's push delivery ([[deliver]]) to a local webhook receiver and to
# Sidekiq through a real redis-server, both played by examples/deliverysink.rs, which records when
# each message arrives. Two measurements per receiver and concurrency:
#   drain: N messages spooled with no [[deliver]]; mailgate restarted on the same spool with
#          the deliverer on; jobs/s until the receiver has all N.
#   concurrent: the intake benchmark's load (examples/loadgen.rs) with the deliverer on; the
#          backlog (ready+leased from GET /v1/stats every 0.2 s), how long after intake ends the
#          backlog is gone, and the latency from each message's 250 (loadgen --times) to its
#          arrival at the receiver, joined on Message-ID.
#
# Prints a markdown section on stdout (progress on stderr); scripts/bench.sh puts it into
# docs/BENCHMARKS.md. Standalone: `scripts/bench-delivery.sh` after
# `cargo build --release --bin mailgate --example loadgen --example deliverysink`.
# Measurements, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
DL_MESSAGES=${DL_MESSAGES:-20000}
DL_CONCURRENCY=${DL_CONCURRENCY:-"4 8 16"}
DL_MORE_SESSIONS=${DL_MORE_SESSIONS:-50}   # concurrent runs at the default concurrency (16) with more sessions
TIMEOUT=${DL_TIMEOUT:-300}               # seconds to wait for one run's delivery
KEY=0123456789abcdef0123456789abcdef
RCPT="incoming+$KEY@localhost"
BIN=target/release/mailgate
LOADGEN=target/release/examples/loadgen
SINK=target/release/examples/deliverysink
REDIS=$(command -v redis-server || echo /usr/bin/redis-server)
N=$DL_MESSAGES

for f in "$BIN" "$LOADGEN" "$SINK" "$REDIS"; do
  [ -x "$f" ] || { echo "bench-delivery: $f is missing (cargo build --release --bin mailgate --example loadgen --example deliverysink; apt-get install redis-server)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/mailgate-bench-delivery.XXXXXX)
pids=()   # every process this script started and has not waited for yet: killed by PID on exit

# log, free_port, wait_port, now, forget, stop_pid, term_pids, wait_pids, write_config
source scripts/lib-bench.sh
# machine-wide CPU: "busy total" jiffies so far (busy = all but idle and iowait)
cpu_snap() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
busy_pct() { python3 -c "b0,t0,b1,t1=map(float,'$1 $2'.split()); print(round(100*(b1-b0)/max(t1-t0,1)))"; }
cpu_s() { awk '{printf "%.1f", ($14+$15)/100}' "/proc/$1/stat" 2>/dev/null || echo n/a; }   # utime+stime, USER_HZ=100
cleanup() { term_pids; wait_pids; rm -rf "$work"; }
trap cleanup EXIT

# --- redis-server: one for the whole script, a new list key per run --------------------------
redis_port=$(free_port)
mkdir -p "$work/redis"
"$REDIS" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no --dir "$work/redis" \
  > "$work/redis/log" 2>&1 &
redis_pid=$!; pids+=("$redis_pid")
wait_port "$redis_port"
REDIS_URL="redis://127.0.0.1:$redis_port/0"
redis_version=$("$REDIS" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')

printf 'mailgate-bench-delivery-webhook-key\n' > "$work/webhook.key"

# deliver_toml KIND CONCURRENCY SINK_ADDR_OR_QUEUE -> the [[deliver]] entry
deliver_toml() {
  case $1 in
    webhook) printf '[[deliver]]\nkind = "webhook"\nurl = "http://%s/mail"\nsecret_file = "%s"\nconcurrency = %s\n' "$3" "$work/webhook.key" "$2" ;;
    sidekiq) printf '[[deliver]]\nkind = "sidekiq"\nredis_url = "%s"\nqueue = "%s"\nconcurrency = %s\n' "$REDIS_URL" "$3" "$2" ;;
  esac
}

# mg_start DIR DELIVER_TOML: new ports (SMTP, HTTP), starts mailgate (mg_pid), waits for both ports
mg_start() {
  SMTP=$(free_port); HTTP=$(free_port)
  # as scripts/bench.sh (authentication off), spool retention 1h, DELIVER_TOML after [auth]
  write_config "$1" "$SMTP" "$HTTP" off "" 'retention = "1h"' "$2"
  MAILGATE_LOG=warn $BIN serve --config "$1/mailgate.toml" 2>>"$1/mailgate.log" &
  mg_pid=$!; pids+=("$mg_pid")
  wait_port "$SMTP"; wait_port "$HTTP"
}

# sink_start KIND DIR -> sink_pid, SINK_TARGET (the webhook address or the Redis queue name)
sink_start() {
  local kind=$1 d=$2
  if [ "$kind" = webhook ]; then
    SINK_TARGET="127.0.0.1:$(free_port)"
    $SINK http "$SINK_TARGET" --expect "$N" --out "$d/arrivals.tsv" --idle-exit 60 > "$d/sink.json" 2>"$d/sink.log" &
    sink_pid=$!; pids+=("$sink_pid")
    wait_port "${SINK_TARGET#*:}"
  else
    SINK_TARGET="bench-$RANDOM$RANDOM"
    $SINK redis "$REDIS_URL" "queue:$SINK_TARGET" --expect "$N" --out "$d/arrivals.tsv" --idle-exit 60 > "$d/sink.json" 2>"$d/sink.log" &
    sink_pid=$!; pids+=("$sink_pid")
  fi
}

# sampler HTTP_PORT OUT: GET /v1/stats every 0.2 s -> "t ready leased done dead waiting" lines,
# until done+dead reaches N (or TIMEOUT)
sampler() {
  python3 - "$1" "$2" "$N" "$TIMEOUT" <<'PY'
import sys, time, json, urllib.request
url, out, n, limit = f"http://127.0.0.1:{sys.argv[1]}/v1/stats", sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
end = time.time() + limit
with open(out, "w") as f:
    while time.time() < end:
        t = time.time()
        try:
            s = json.load(urllib.request.urlopen(url, timeout=5))
        except Exception as e:
            print(f"stats: {e}", file=sys.stderr); time.sleep(0.2); continue
        f.write(f"{t:.6f} {s['ready']} {s['leased']} {s['done']} {s['dead']} {s['waiting']}\n"); f.flush()
        if s["done"] + s["dead"] >= n:
            sys.exit(0)
        time.sleep(max(0.0, 0.2 - (time.time() - t)))
sys.exit(1)
PY
}

log_summary() { # mailgate.log -> "W warnings, E errors" plus the first distinct message
  python3 - "$1" <<'PY'
import sys, re, collections
lines = open(sys.argv[1], errors="replace").read().splitlines()
w = sum(1 for l in lines if " WARN " in l or '"WARN"' in l)
e = sum(1 for l in lines if " ERROR " in l or '"ERROR"' in l)
print(f"{w}/{e}")
PY
}

# --- a. drain ---------------------------------------------------------------------------------
# drain KIND CONC -> "jobs_per_s_wall jobs_per_s_sink done_s mg_cpu_s intake_alone unique dead warn/err busy% intake_cpu_s"
drain() {
  local kind=$1 conc=$2 d lg t0 t_done sinkj
  d="$work/drain-$kind-$conc"; mkdir -p "$d"
  mg_start "$d" ""
  lg=$($LOADGEN "127.0.0.1:$SMTP" --sessions "$SESSIONS" --messages "$N" --size "$SIZE")
  local icpu; icpu=$(cpu_s "$mg_pid")
  stop_pid "$mg_pid"
  sink_start "$kind" "$d"
  local c0 cpu busy; c0=$(cpu_snap)
  t0=$(now)
  mg_start "$d" "$(deliver_toml "$kind" "$conc" "$SINK_TARGET")"
  sampler "$HTTP" "$d/stats.txt" || log "drain $kind c=$conc: done never reached $N"
  t_done=$(tail -1 "$d/stats.txt" | cut -d' ' -f1)
  cpu=$(cpu_s "$mg_pid"); busy=$(busy_pct "$c0" "$(cpu_snap)")
  wait "$sink_pid" || true; forget "$sink_pid"
  stop_pid "$mg_pid"
  python3 - "$t0" "$t_done" "$N" "$d/sink.json" "$cpu" "$lg" "$(tail -1 "$d/stats.txt")" "$(log_summary "$d/mailgate.log")" "$busy" "$icpu" <<'PY'
import sys, json
t0, t_done, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
try:
    s = json.load(open(sys.argv[4]))
except Exception:
    s = {"received": 0, "unique": 0, "first": 0, "last": 0, "per_second": 0}
lg = json.loads(sys.argv[6]); st = sys.argv[7].split()
wall = round(s["received"] / (s["last"] - t0)) if s["received"] else "n/a"
print(wall, s["per_second"], f"{t_done - t0:.1f}", sys.argv[5], lg["per_second"], s["unique"], st[4], sys.argv[8], sys.argv[9], sys.argv[10])
PY
}

# --- b. concurrent ----------------------------------------------------------------------------
# concurrent KIND CONC SESSIONS -> "intake max_backlog backlog_at_end drain_after_s last_after_s p50 p99 max matched unique dead warn/err mg_cpu early% busy%"
concurrent() {
  local kind=$1 conc=$2 sessions=$3 d lg t_end spid cpu c0 busy
  d="$work/conc-$kind-$conc-$sessions"; mkdir -p "$d"
  sink_start "$kind" "$d"
  mg_start "$d" "$(deliver_toml "$kind" "$conc" "$SINK_TARGET")"
  sampler "$HTTP" "$d/stats.txt" &
  spid=$!; pids+=("$spid")
  c0=$(cpu_snap)
  lg=$($LOADGEN "127.0.0.1:$SMTP" --sessions "$sessions" --messages "$N" --size "$SIZE" --times "$d/times.tsv")
  t_end=$(now)
  wait "$spid" || log "concurrent $kind c=$conc: done never reached $N"; forget "$spid"
  cpu=$(cpu_s "$mg_pid"); busy=$(busy_pct "$c0" "$(cpu_snap)")
  wait "$sink_pid" || true; forget "$sink_pid"
  stop_pid "$mg_pid"
  python3 - "$d" "$t_end" "$lg" "$(log_summary "$d/mailgate.log")" "$cpu" "$busy" <<'PY'
import sys, json
d, t_end, lg = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
samples = [l.split() for l in open(f"{d}/stats.txt") if l.strip()]
samples = [(float(t), int(r), int(le), int(do), int(de)) for t, r, le, do, de, _ in samples]
backlog = [(t, r + le) for t, r, le, _, _ in samples]
max_backlog = max((b for _, b in backlog), default=0)
done_t = samples[-1][0] if samples and samples[-1][3] + samples[-1][4] >= int(lg["messages"]) else None
# the first sample after intake ended; none when the backlog was gone before loadgen exited
at_end = next((b for t, b in backlog if t >= t_end), 0 if done_t else "n/a")
drain_after = f"{max(0.0, done_t - t_end):.1f}" if done_t else "n/a"
try:
    s = json.load(open(f"{d}/sink.json"))
except Exception:
    s = {"last": 0, "unique": 0}
last_after = f"{s['last'] - t_end:.2f}" if s.get("last") else "n/a"
sent = {}
for l in open(f"{d}/times.tsv"):
    mid, t = l.rstrip("\n").split("\t"); sent[mid] = float(t)
arrived = {}
for l in open(f"{d}/arrivals.tsv"):
    mid, t = l.rstrip("\n").split("\t")
    arrived.setdefault(mid, float(t))
lat = sorted((arrived[m] - sent[m]) * 1000 for m in sent if m in arrived)
early = f"{100 * sum(1 for x in lat if x < 0) / len(lat):.0f}" if lat else "n/a"
pct = lambda p: f"{lat[min(int(len(lat) * p), len(lat) - 1)]:.1f}" if lat else "n/a"
dead = samples[-1][4] if samples else "n/a"
print(lg["per_second"], max_backlog, at_end, drain_after, last_after, pct(0.50), pct(0.99),
      f"{lat[-1]:.1f}" if lat else "n/a", len(lat), s.get("unique", 0), dead, sys.argv[4], sys.argv[5], early, sys.argv[6])
PY
}

declare -A D C
runs=()   # "kind concurrency sessions" of every concurrent run, in table order
for kind in webhook sidekiq; do
  for conc in $DL_CONCURRENCY; do
    D[$kind/$conc]=$(drain "$kind" "$conc")
    log "drain $kind concurrency $conc: ${D[$kind/$conc]}"
    C[$kind/$conc/$SESSIONS]=$(concurrent "$kind" "$conc" "$SESSIONS")
    log "concurrent $kind concurrency $conc: ${C[$kind/$conc/$SESSIONS]}"
    runs+=("$kind $conc $SESSIONS")
  done
  for s in $DL_MORE_SESSIONS; do
    C[$kind/16/$s]=$(concurrent "$kind" 16 "$s")
    log "concurrent $kind concurrency 16, $s sessions: ${C[$kind/16/$s]}"
    runs+=("$kind 16 $s")
  done
done

verdict() { # KIND -> one line: per concurrent run, whether the backlog stayed under one second
             # of intake and was gone within 5 s of intake's end
  local kind=$1 parts=() k conc sessions intake maxb at_end gone v
  for run in "${runs[@]}"; do
    read -r k conc sessions <<<"$run"
    [ "$k" = "$kind" ] || continue
    read -r intake maxb at_end gone _ <<<"${C[$kind/$conc/$sessions]}"
    if python3 -c "import sys; sys.exit(0 if float('$gone') <= 5 and float('$maxb') <= float('$intake') else 1)" 2>/dev/null
    then v="keeps up"; else v="falls behind"; fi
    parts+=("concurrency $conc, $sessions sessions: $v at $intake msg/s (backlog at most $maxb, $at_end when intake ended, gone $gone s later)")
  done
  local IFS=';'
  echo "${parts[*]}" | sed 's/;/; /g'
}

mg_cpu_note=$(nproc)
cat <<EOF
## Delivery: webhook and Sidekiq

Push delivery (\`[[deliver]]\`) from mailgate's spool to a local receiver: examples/deliverysink.rs
as the webhook endpoint (axum on loopback, answers 200 \`{"success":true}\` at once), and as a
Sidekiq consumer popping mailgate's \`LPUSH\`es off a real redis-server $redis_version (\`--save "" --appendonly no\`,
loopback). Authentication off, $SIZE-byte messages, $SESSIONS SMTP sessions (the concurrent runs also at
$DL_MORE_SESSIONS with the default 16 workers), one run per cell; the
receiver, Redis, mailgate and the load generator share the machine's $mg_cpu_note cores.
Target (issue): delivery keeps up with intake, no growing backlog at the intake benchmark's rate.

**Drain**: $N messages spooled with no \`[[deliver]]\`, mailgate stopped and started again on the same
spool with the deliverer on. jobs/s = $N / (mailgate start → the receiver has the last message);
"receiver" is $N over the receiver's first..last arrival (without mailgate's start-up);
"done" is when \`GET /v1/stats\` first showed done = $N (polled every 0.2 s). "mailgate CPU" is its
user+system time over start-up and the whole drain; "machine busy" is all cores over the same time.
The last column is the loading phase (loadgen, no deliverer): its intake rate and mailgate's CPU time.

| receiver | concurrency | jobs/s | jobs/s at the receiver | done after s | mailgate CPU s | machine busy | received (unique) | dead | log warn/error | intake alone: msg/s, mailgate CPU s |
|---|---|---|---|---|---|---|---|---|---|---|
$(for kind in webhook sidekiq; do for conc in $DL_CONCURRENCY; do
  read -r wall sinkps done_s cpu alone uniq dead we busy icpu <<<"${D[$kind/$conc]}"
  echo "| $kind | $conc | $wall | $sinkps | $done_s | $cpu | $busy % | $uniq | $dead | $we | $alone, $icpu |"
done; done)

**Concurrent**: the intake load with the deliverer on (fresh spool). Backlog = ready + leased
(\`GET /v1/stats\` every 0.2 s; "at intake end" is the first sample after loadgen exited, 0 when
everything was delivered before). "gone after" = intake end → done = $N; "last arrival" = intake
end → the receiver's last message (negative: before loadgen exited; it writes its times file
last). Latency: per message, the receiver's arrival time minus the time loadgen got the 250 to
its DATA, joined on Message-ID (first arrival if delivered twice); "before the 250" is the share
of messages that reached the receiver before loadgen had read their 250 (negative latency).
"machine busy": all cores, from loadgen's start until done = $N. Intake with no deliverer: the
last column of the drain table.

| receiver | concurrency | sessions | intake msg/s | max backlog | backlog at intake end | gone after s | last arrival after s | 250 → receiver p50 ms | p99 ms | max ms | before the 250 | matched | dead | log warn/error | mailgate CPU s | machine busy |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
$(for run in "${runs[@]}"; do
  read -r kind conc sessions <<<"$run"
  read -r intake maxb at_end gone last p50 p99 mx matched _ dead we cpu early busy <<<"${C[$kind/$conc/$sessions]}"
  echo "| $kind | $conc | $sessions | $intake | $maxb | $at_end | $gone | $last | $p50 | $p99 | $mx | $early % | $matched | $dead | $we | $cpu | $busy % |"
done)

Keeps up? (the backlog never more than one second of intake, and gone within 5 s of the end of
intake; a measurement, not a test)

- webhook: $(verdict webhook)
- Sidekiq: $(verdict sidekiq)

Commands (PORT, SINKPORT, REDISPORT: free loopback ports; FILE: temp files):

\`\`\`
$REDIS --port REDISPORT --bind 127.0.0.1 --save "" --appendonly no --daemonize no
$SINK http 127.0.0.1:SINKPORT --expect $N --out FILE --idle-exit 60
$SINK redis redis://127.0.0.1:REDISPORT/0 queue:QUEUE --expect $N --out FILE --idle-exit 60
$LOADGEN 127.0.0.1:PORT --sessions $SESSIONS (or $DL_MORE_SESSIONS) --messages $N --size $SIZE [--times FILE]
MAILGATE_LOG=warn $BIN serve --config FILE
\`\`\`

mailgate's config (webhook, concurrency ${DL_CONCURRENCY%% *}; the drain's first start has no \`[[deliver]]\`):

\`\`\`toml
$(sed -e 's/address = "127.0.0.1:[0-9]*"/address = "127.0.0.1:PORT"/; s/listen = "127.0.0.1:[0-9]*"/listen = "127.0.0.1:HTTP"/; s|url = "http://127.0.0.1:[0-9]*/|url = "http://127.0.0.1:SINKPORT/|; s|dir = ".*"|dir = "/tmp/DIR/spool"|; s|secret_file = ".*"|secret_file = "FILE"|' "$work/conc-webhook-${DL_CONCURRENCY%% *}-$SESSIONS/mailgate.toml")
# or, for Sidekiq, instead of the webhook entry:
$(deliver_toml sidekiq "${DL_CONCURRENCY%% *}" QUEUE | sed "s|$REDIS_URL|redis://127.0.0.1:REDISPORT/0|")
\`\`\`
EOF
