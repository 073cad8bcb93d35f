#!/usr/bin/env bash
# make bench, the intake matrix: for each message size and number of sessions, the same
# smtp-source command and the same examples/loadgen.rs command against
#   - Postfix's smtp-sink (no storage: the ceiling),
#   - a private Postfix queueing to `discard:` (the durable MTA peer; needs root),
#   - mailgate serve, sender authentication off (durable),
#   - mailgate serve, SPF+DKIM+DMARC on (records from examples/benchdns.rs on loopback).
# msg/s from smtp-source; end-of-DATA->250 p50/p99 from loadgen; peak RSS per server.
#
# Prints a markdown section `## Intake matrix` on stdout (progress on stderr). Standalone:
#   cargo build --release --bin mailgate --example loadgen --example benchdns
#   scripts/bench-matrix.sh
# Knobs (environment): SIZES ("4096 102400"), SESSIONS_LIST ("1 20 50"), RUNS (1),
# MESSAGES (one count for every cell) or MESSAGES_<size>_<sessions> (one cell, e.g.
# MESSAGES_102400_50=1500), MAILGATE_BIN / LOADGEN_BIN / BENCHDNS_BIN (binaries),
# PF_TIMEOUT (300 s: how long to wait for Postfix to discard a run's messages).
# Measurements, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"4096 102400"}
SESSIONS_LIST=${SESSIONS_LIST:-"1 20 50"}
RUNS=${RUNS:-1}
DOMAIN=mx.test
KEY=0123456789abcdef0123456789abcdef
RCPT="incoming+$KEY@$DOMAIN"
BIN=${MAILGATE_BIN:-target/release/mailgate}
LOADGEN=${LOADGEN_BIN:-target/release/examples/loadgen}
BENCHDNS=${BENCHDNS_BIN:-target/release/examples/benchdns}
SRC=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
TIMEOUT=${PF_TIMEOUT:-300}
LG_FROM=alice@bench.test   # loadgen's sender: DKIM-signed (Ed25519) for bench.test, SPF pass

# messages per run (smtp-source and loadgen alike) for SIZE SESSIONS: a few seconds per run
# for the slowest server on this 2-core machine
messages_for() {
  local var="MESSAGES_$1_$2"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  if [ -n "${MESSAGES:-}" ]; then echo "$MESSAGES"; return; fi
  case "$1:$2" in
    4096:1) echo 2000 ;;
    4096:*) echo 5000 ;;
    102400:1) echo 500 ;;
    102400:*) echo 1500 ;;
    *) echo 1000 ;;
  esac
}

for f in "$BIN" "$LOADGEN" "$BENCHDNS" "$SRC" "$SINK"; do
  [ -x "$f" ] || { echo "bench-matrix: $f missing (cargo build --release --bin mailgate --example loadgen --example benchdns; Debian package postfix)" >&2; exit 1; }
done

started=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
work=$(mktemp -d /tmp/mailgate-bench-matrix.XXXXXX)
chmod 755 "$work"   # Postfix's daemons (user postfix) must reach the queue and log paths
pids=()             # smtp-sink, mailgate, benchdns, RSS samplers still running: stopped by PID
pf_dirs=()          # Postfix instances still running: stopped by PID (pf_stop)

# log, free_port, wait_port, now, rate, machine_desc, forget, stop_pid, wait_pids, source_cmd,
# benchdns_start, write_config
source scripts/lib-bench.sh
# a private Postfix: alive, main_cf_common, pf_start, pf_stop, pf_stop_all, poll_discard
source scripts/lib-postfix.sh

kill_tree() { # PID: SIGTERM to the process's children (a backgrounded shell function's python), then to it
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$c"; done
  kill -TERM "$1" 2>/dev/null || true
}
cleanup() {
  local p
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill_tree "$p"; done
  pf_stop_all
  wait_pids
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # run cleanup (EXIT) on a signal too

is_root=0; [ "$(id -u)" = 0 ] && is_root=1
sink_user=$([ $is_root = 1 ] && echo "-u nobody" || echo "")

loadgen_cmd() { echo "$LOADGEN 127.0.0.1:$4 --sessions $2 --messages $3 --size $1 --from $LG_FROM --rcpt $RCPT --dkim ed25519"; }

# --- servers ----------------------------------------------------------------------------------

PF_CF="transport_maps = inline:{ $DOMAIN=discard: }
smtpd_recipient_restrictions = reject_unauth_destination
smtpd_client_connection_count_limit = 1000"

# start_server KIND DIR: sets PORT and SPID (the process whose VmHWM is the peak RSS; for
# Postfix, the master), HTTP for mailgate
start_server() {
  local kind=$1 d=$2
  mkdir -p "$d"; chmod 755 "$d"
  PORT=$(free_port); HTTP=""
  case $kind in
    sink)
      # shellcheck disable=SC2086
      $SINK $sink_user -c "127.0.0.1:$PORT" 1000 >/dev/null 2>"$d/sink.err" &
      SPID=$!; pids+=("$SPID"); wait_port "$PORT" ;;
    postfix)
      pf_start "$d" "$PORT" "$PF_CF"
      for _ in $(seq 1 100); do [ -s "$d/queue/pid/master.pid" ] && break; sleep 0.05; done
      SPID=$(tr -d ' \n' < "$d/queue/pid/master.pid") ;;
    mg-off|mg-on)
      HTTP=$(free_port)
      # bench.sh's mailgate config, mailbox (and [server] hostname) on $DOMAIN
      write_config "$d" "$PORT" "$HTTP" "$([ "$kind" = mg-off ] && echo off || echo "$DNS")" "$DOMAIN"
      MAILGATE_LOG=warn $BIN serve --config "$d/mailgate.toml" 2>"$d/mailgate.log" &
      SPID=$!; pids+=("$SPID"); wait_port "$PORT"; wait_port "$HTTP" ;;
  esac
}

stop_server() { # KIND DIR
  case $1 in
    postfix) pf_stop "$2" ;;
    *) stop_pid "$SPID" ;;
  esac
}

# rss_sampler MASTER_PID OUT: every 0.25 s, the sum of VmRSS and of Pss over MASTER_PID and all
# its descendants, and the largest smtpd VmHWM; writes "max_rss_kib max_pss_kib max_smtpd_kib
# max_processes" to OUT on SIGTERM
rss_sampler() {
  python3 - "$1" "$2" <<'PY' &
import os, sys, time, signal
master, out = int(sys.argv[1]), sys.argv[2]
peak = [0, 0, 0, 0]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
def field(path, name):
    try:
        for line in open(path):
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
while not stop:
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read()
            except OSError:
                continue
            children.setdefault(int(st.rsplit(")", 1)[1].split()[1]), []).append(int(e))
    tree, i = [master], 0
    while i < len(tree):
        tree += children.get(tree[i], []); i += 1
    rss = pss = smtpd = 0
    for p in tree:
        rss += field(f"/proc/{p}/status", "VmRSS:")
        pss += field(f"/proc/{p}/smaps_rollup", "Pss:")
        try:
            if open(f"/proc/{p}/comm").read().strip() == "smtpd":
                smtpd = max(smtpd, field(f"/proc/{p}/status", "VmHWM:"))
        except OSError:
            pass
    for k, v in enumerate((rss, pss, smtpd, len(tree))):
        peak[k] = max(peak[k], v)
    time.sleep(0.25)
open(out, "w").write(" ".join(map(str, peak)) + "\n")
PY
  SAMPLER=$!; pids+=("$SAMPLER")
}

ready_jobs() { python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/stats"))["ready"])' "$1"; }

# --- one measurement: KIND SIZE S M RUN -> appends a line to $work/results --------------------
# line: kind size sessions run source_rate source_errors lg_rate p50 p99 lg_errors lost rss_kib extra
measure() {
  local kind=$1 size=$2 s=$3 m=$4 run=$5 d t0 t1 rc rate serr lg lgn expected lost rss extra poll_out ppid_poll
  d="$work/$kind-$size-$s-$run"
  start_server "$kind" "$d"
  [ "$kind" = postfix ] && rss_sampler "$SPID" "$d/rss"
  lgn=$(( m / s * s ))
  expected=$(( m + lgn ))

  # smtp-source (for Postfix, a poller notes when discard has delivered all of them)
  if [ "$kind" = postfix ]; then
    poll_out="$d/poll"; poll_discard "$d/postfix.log" "$m" > "$poll_out" & ppid_poll=$!; pids+=("$ppid_poll")
  fi
  rc=0
  t0=$(now); $(source_cmd "$size" "$s" "$m" "$PORT") >/dev/null 2>"$d/source.err" || rc=$?; t1=$(now)
  rate=$(rate "$m" "$t0" "$t1")
  serr=$(grep -c . "$d/source.err" || true)
  [ "$rc" != 0 ] && [ "$serr" = 0 ] && serr=1
  [ "$serr" != 0 ] && { log "$kind $size B x$s: smtp-source exit $rc:"; head -5 "$d/source.err" >&2; cp "$d/source.err" "$work/source-errors-$kind-$size-$s-$run"; }
  extra=""
  if [ "$kind" = postfix ]; then
    wait "$ppid_poll" || true; forget "$ppid_poll"
    extra=$(python3 -c "
import math; t=float('$(cut -d' ' -f1 < "$poll_out")')
print('nan' if math.isnan(t) else round($m/(t-$t0)))")
  fi

  # loadgen: end of DATA -> 250
  lg=$($(loadgen_cmd "$size" "$s" "$m" "$PORT") 2>"$d/loadgen.err") || true
  [ -s "$d/loadgen.err" ] && { log "$kind $size B x$s: loadgen:"; head -5 "$d/loadgen.err" >&2; }
  [ -n "$lg" ] || lg='{"per_second":0,"p50_ms":NaN,"p99_ms":NaN,"errors":1}'   # loadgen failed: 1 error

  # every accepted message arrived? (Postfix: discarded; mailgate: a ready job)
  lost=0
  case $kind in
    postfix)
      read -r _ got <<<"$(poll_discard "$d/postfix.log" "$expected" || true)"
      lost=$(( expected - got )) ;;
    mg-*)
      got=$(ready_jobs "$HTTP" || echo 0); lost=$(( expected - got )) ;;
  esac

  case $kind in
    postfix)
      stop_pid "$SAMPLER"
      [ -s "$d/rss" ] || echo "0 0 0 0" > "$d/rss"
      rss=$(cut -d' ' -f1 < "$d/rss"); extra="$extra $(cut -d' ' -f2- < "$d/rss" | tr ' ' ,)" ;;
    *) rss=$(awk '/VmHWM/{print $2}' "/proc/$SPID/status" 2>/dev/null || true)
       [ -n "$rss" ] || { log "$kind $size B x$s: the server (PID $SPID) is gone"; rss=0; } ;;
  esac
  [ "$kind" = mg-on ] && [ "$run" = "$RUNS" ] && cp "$d/mailgate.toml" "$work/mg-on.toml"
  [ "$kind" = mg-off ] && [ "$run" = "$RUNS" ] && cp "$d/mailgate.toml" "$work/mg-off.toml"
  [ "$kind" = postfix ] && [ "$run" = "$RUNS" ] && cp "$d/conf/main.cf" "$work/postfix-main.cf"
  stop_server "$kind" "$d"
  rm -rf "$d"; sync
  read -r lrate p50 p99 lerr <<<"$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["per_second"], r["p50_ms"], r["p99_ms"], r["errors"])' "$lg")"
  echo "$kind $size $s $run $rate $serr $lrate $p50 $p99 $lerr $lost $rss ${extra:--}" >> "$work/results"
  log "$kind $size B x$s run $run: $rate msg/s (smtp-source, $serr errors)${extra:+ [postfix: delivered msg/s, pss/smtpd/procs: $extra]}; loadgen $lrate msg/s p50 $p50 p99 $p99 ms, $lerr errors; $lost missing; peak RSS $((rss/1024)) MiB"
}

# --- run -----------------------------------------------------------------------------------------

benchdns_start "$work/dns.addr"
DNS=$(head -1 "$work/dns.addr")

kinds="sink postfix mg-off mg-on"
[ $is_root = 1 ] || { kinds="sink mg-off mg-on"; log "not root: Postfix -> discard: is not measured"; }
: > "$work/results"
for size in $SIZES; do
  for s in $SESSIONS_LIST; do
    m=$(messages_for "$size" "$s")
    for run in $(seq 1 "$RUNS"); do
      order=$kinds
      [ $((run % 2)) = 0 ] && order=$(echo "$kinds" | tr ' ' '\n' | tac | tr '\n' ' ')   # drift hits all
      for kind in $order; do measure "$kind" "$size" "$s" "$m" "$run"; done
    done
  done
done
total=$(( $(date +%s) - started ))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report --------------------------------------------------------------------------------------

cells=$(for size in $SIZES; do for s in $SESSIONS_LIST; do printf '%s:%s:%s ' "$size" "$s" "$(messages_for "$size" "$s")"; done; done)
table=$(python3 - "$work/results" "$SIZES" "$SESSIONS_LIST" "$kinds" "$cells" <<'PY'
import sys, statistics, math
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
sizes, sessions, kinds = sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
msgs = dict(((a, b), m) for a, b, m in (x.split(":") for x in sys.argv[5].split()))
names = {"sink": "smtp-sink (no storage)", "postfix": "Postfix → `discard:` (durable queue)",
         "mg-off": "mailgate, auth off", "mg-on": "mailgate, auth on"}
def med(v):
    v = [float(x) for x in v if not math.isnan(float(x))]
    return statistics.median(v) if v else float("nan")
def fmt_size(b):
    b = int(b); return f"{b // 1024} KiB" if b % 1024 == 0 else f"{b} B"
cell = {}
for k, size, s, run, rate, serr, lrate, p50, p99, lerr, lost, rss, *extra in rows:
    c = cell.setdefault((k, size, s), {"rate": [], "serr": 0, "lrate": [], "p50": [], "p99": [], "lerr": 0, "lost": 0, "rss": 0, "pss": 0})
    if k == "postfix" and len(extra) > 1:
        c["pss"] = max(c["pss"], int(extra[1].split(",")[0]))
    c["rate"].append(rate); c["lrate"].append(lrate); c["p50"].append(p50); c["p99"].append(p99)
    c["serr"] += int(serr); c["lerr"] += int(lerr); c["lost"] += max(int(lost), 0); c["rss"] = max(c["rss"], int(rss))
def r(k, size, s):
    c = cell.get((k, size, s)); return med(c["rate"]) if c else float("nan")
def ratio(a, b):
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"
out = ["| size | sessions | messages | server | msg/s (smtp-source) | ÷ smtp-sink | ÷ Postfix→discard | loadgen msg/s | p50 ms | p99 ms | peak RSS | errors |",
       "|---|---|---|---|---|---|---|---|---|---|---|---|"]
auth = []
for size in sizes:
    for s in sessions:
        for k in kinds:
            c = cell.get((k, size, s))
            if not c:
                continue
            rate = med(c["rate"])
            bold = k.startswith("mg-")
            rs = ratio(rate, r("sink", size, s)); rp = ratio(rate, r("postfix", size, s))
            if bold:
                rs, rp = f"**{rs}**", f"**{rp}**"
            err = c["serr"] + c["lerr"] + c["lost"]
            errtxt = str(err) if err == 0 else f"{err} (smtp-source {c['serr']}, loadgen {c['lerr']}, missing {c['lost']})"
            rss = f"{c['rss'] / 1024:.0f} MiB"
            if k == "postfix":
                rss += f" (RSS sum; PSS sum {c['pss'] / 1024:.0f} MiB)"
            out.append(f"| {fmt_size(size)} | {s} | {msgs[(size, s)]} | {names[k]} | {rate:.0f} | {rs} | {rp} | {med(c['lrate']):.0f} | {med(c['p50']):.2f} | {med(c['p99']):.2f} | {rss} | {errtxt} |")
        off, on = cell.get(("mg-off", size, s)), cell.get(("mg-on", size, s))
        if off and on:
            auth.append(f"- {fmt_size(size)}, {s} session{'s' if s != '1' else ''}: smtp-source (unsigned; SPF+DMARC) "
                        f"**{ratio(med(on['rate']), med(off['rate']))}**; loadgen (DKIM-signed; SPF+DKIM+DMARC) "
                        f"**{ratio(med(on['lrate']), med(off['lrate']))}**, p50 {med(off['p50']):.2f} → {med(on['p50']):.2f} ms, "
                        f"p99 {med(off['p99']):.2f} → {med(on['p99']):.2f} ms")
print("\n".join(out))
print("\nmailgate, authentication on ÷ off (msg/s; target ≥ 0.70, measured by bench.sh as the median of its runs):\n")
print("\n".join(auth))
PY
)

pf_extra=$(awk '$1=="postfix"{split($14,a,","); printf "%s%s B x%s run %s: delivered %s msg/s, PSS %d MiB, smtpd VmHWM %d MiB, %s processes", (n++?"; ":""), $2, $3, $4, $13, a[1]/1024, a[2]/1024, a[3]}' "$work/results")
raw=$(awk '{printf "%s%s %s B x%s run %s: %s", (n++?"; ":""), $1, $2, $3, $4, $5}' "$work/results")
machine=$(machine_desc)
pf_version=$(postconf -d mail_version 2>/dev/null | sed 's/.*= //' || echo "?")
hide_ports() { sed -e 's/127\.0\.0\.1:[0-9]\{2,5\}"/127.0.0.1:PORT"/' -e "s|dir = \".*\"|dir = \"/tmp/DIR/spool\"|" -e "s|nameservers = \[\".*\"\]|nameservers = [\"127.0.0.1:DNS\"]|"; }

cat <<EOF
## Intake matrix

Written by scripts/bench-matrix.sh on $(date -u +%Y-%m-%d) in $((total / 60)) min $((total % 60)) s; $RUNS run(s) per cell
(median msg/s and latency, largest RSS, errors summed), every run on fresh server instances.
Machine: $machine; $(rustc --version 2>/dev/null || echo "rustc ?");
Postfix $pf_version. Load average (1, 5, 15 min) at the start: $load_start; at the end: $load_end.
Load generators and servers share the cores (and anything else running on the machine): compare the
ratios, not the absolute numbers, and take single runs (RUNS=1) as indications only.

In every cell the four servers get the same two loads, one after the other on the same instance:
the same smtp-source command (msg/s: its messages divided by its run time; every message is one
session's next MAIL/RCPT/DATA, no pipelining) and the same examples/loadgen.rs command (p50/p99: the time from
the end of DATA to the 250; pipelined MAIL/RCPT/DATA; Ed25519 DKIM-signed mail from \`$LG_FROM\`; its own
msg/s leaves out building and signing the messages, done before its clock starts).

$table

- Servers: **smtp-sink** replies 250 without storing anything (the ceiling). **Postfix → \`discard:\`** is a
  private Postfix (root, \`postfix -c DIR start-fg\`, scripts/lib-postfix.sh) whose transport sends $DOMAIN to
  \`discard:\`: it replies 250 only after cleanup has written and fsynced the queue file, then discards it
  (the durable MTA peer). **mailgate** replies 250 after its group commit (journal fdatasync). **auth on**:
  SPF+DKIM+DMARC with the default policies against examples/benchdns.rs on loopback (records cached after the
  first message). smtp-source cannot DKIM-sign and sends from \`a@example.org\`, which has no records (NXDOMAIN):
  its auth-on rate measures the SPF and DMARC lookups and evaluation, not DKIM verification; loadgen's mail is
  DKIM-signed for bench.test (SPF pass, DKIM pass, DMARC pass), so its auth-on numbers include DKIM verification.
- Peak RSS: mailgate's and smtp-sink's VmHWM from /proc/PID/status after both loads. Postfix: the largest
  sum of VmRSS over the master and all its children (smtpd, cleanup, qmgr, trivial-rewrite, discard, …),
  sampled every 0.25 s during both loads; shared pages (libraries, the binaries) are counted once per process,
  so it overstates the memory used: the PSS sum (shared pages divided among their users) is beside it, and the
  largest single smtpd's VmHWM is in the raw results below.
- errors: smtp-source's error lines (or a non-zero exit), loadgen's non-250 replies and failed sessions, and
  messages that were accepted but did not arrive (Postfix: fewer \`status=sent\` lines from discard than
  messages sent; mailgate: fewer ready jobs in \`GET /v1/stats\` than messages sent).
- Postfix keeps its default flow control (\`in_flow_delay = 1s\`: smtpd slows down when the queue manager falls
  behind); each load waits until Postfix has discarded everything before the next starts. The smtp-source
  runs' delivery rates (start of smtp-source until the last \`status=sent\` in the log) are in the raw results.

Commands (PORT: a free loopback port per server instance; the smtp-source and loadgen lines per cell):

\`\`\`
$SINK $sink_user -c 127.0.0.1:PORT 1000
$(for size in $SIZES; do for s in $SESSIONS_LIST; do m=$(messages_for "$size" "$s"); source_cmd "$size" "$s" "$m" PORT; loadgen_cmd "$size" "$s" "$m" PORT; done; done)
$BIN serve --config FILE
$BENCHDNS
\`\`\`

Postfix main.cf (master.cf: Debian's, \`smtp inet\` replaced by \`127.0.0.1:PORT inet n - n - - smtpd\`, chroot off):

\`\`\`
$( [ -f "$work/postfix-main.cf" ] && sed "s|$work/[^/]*|/tmp/DIR|g" "$work/postfix-main.cf" || echo "(not measured: needs root)")
\`\`\`

mailgate, auth off / auth on (only \`[auth]\` differs):

\`\`\`toml
$(hide_ports < "$work/mg-off.toml")
# auth on:
$(sed -n '/^\[auth\]/,$p' "$work/mg-on.toml" | hide_ports)
\`\`\`

Raw smtp-source msg/s per run: $raw.
$( [ -n "$pf_extra" ] && echo "Postfix → discard: per run: $pf_extra." )

Total run time: $((total / 60)) min $((total % 60)) s.

EOF
log "done in $((total / 60)) min $((total % 60)) s"
