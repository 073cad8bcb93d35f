# Helpers shared by the benchmark scripts: scripts/bench.sh, scripts/bench-matrix.sh,
# scripts/bench-delivery.sh and scripts/bench-postfix.sh. Source it after `cd` to the repository
# root. Some helpers use what the caller provides:
#   pids      an array (pids=()) of the PIDs the script started and has not waited for yet:
#             benchdns_start appends, forget and stop_pid remove; the caller's EXIT trap uses
#             term_pids and wait_pids on whatever is left
#   SRC RCPT  smtp-source and the recipient address (source_cmd)
#   BENCHDNS  examples/benchdns (benchdns_start)
# Only functions are defined here; nothing runs.

# log MESSAGE...: progress on stderr, prefixed with the script's name ("bench-matrix: ...")
log() { local me=${0##*/}; echo "${me%.sh}: $*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [TRIES]: until 127.0.0.1:PORT accepts a connection, TRIES (600) times 0.05 s
wait_port() {
  for _ in $(seq 1 "${2:-600}"); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; return 1
}

now() { date +%s.%N; }

# rate N T0 T1: N over T1 - T0 seconds, rounded
rate() { python3 -c "print(round($1/($3-$2)))"; }

# machine_desc: "N cores (CPU model), M GiB RAM, KERNEL" for the reports; fails when /proc/cpuinfo
# has no model name
machine_desc() {
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') || return
  echo "$(nproc) cores ($cpu), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -sr)"
}

# --- processes --------------------------------------------------------------------------------

forget() { # PID: drop it from pids
  local rest=() x
  for x in "${pids[@]:-}"; do [ -n "$x" ] && [ "$x" != "$1" ] && rest+=("$x"); done
  pids=(${rest[@]+"${rest[@]}"})
}

stop_pid() { # PID: SIGTERM, wait, forget
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  forget "$1"
}

# term_pids, wait_pids: SIGTERM to, then wait for, every PID still in pids (the EXIT trap)
term_pids() { local p; for p in "${pids[@]:-}"; do [ -z "$p" ] || kill -TERM "$p" 2>/dev/null || true; done; }
wait_pids() { local p; for p in "${pids[@]:-}"; do [ -z "$p" ] || wait "$p" 2>/dev/null || true; done; }

# --- load and servers ---------------------------------------------------------------------------

# source_cmd SIZE SESSIONS MESSAGES PORT: the smtp-source command line
source_cmd() { echo "$SRC -c -d -s $2 -m $3 -l $1 -f a@example.org -t $RCPT 127.0.0.1:$4"; }

# benchdns_start FILE: starts $BENCHDNS (a DNS server on loopback with the benchmarks' SPF, DKIM
# and DMARC records), which writes its address to FILE; adds its PID to pids and waits up to 5 s
# for FILE
benchdns_start() {
  "$BENCHDNS" > "$1" &
  pids+=("$!")
  for _ in $(seq 1 100); do [ -s "$1" ] && break; sleep 0.05; done
}

# write_config DIR SMTP_PORT HTTP_PORT AUTH [DOMAIN [SPOOL_EXTRA [TAIL]]]: DIR/mailgate.toml, the
# benchmarks' mailgate config: one SMTP listener, the mailbox incoming+%{key}@DOMAIN, the spool
# in DIR/spool, the HTTP API and [auth].
#   AUTH         "off" (SPF, DKIM and DMARC off) or a DNS server's address (nameservers)
#   DOMAIN       localhost when empty or not given; any other domain is [server] hostname too
#   SPOOL_EXTRA  more [spool] lines (none when empty)
#   TAIL         lines after [auth], such as [[deliver]] entries: when given, written as they
#                are (an empty line when empty)
write_config() {
  local auth domain=${5:-localhost} server="" spool=""
  if [ "$4" = off ]; then auth='spf = "off"
dkim = "off"
dmarc = "off"'; else auth="nameservers = [\"$4\"]"; fi
  [ "$domain" = localhost ] || server="[server]
hostname = \"$domain\"
"
  [ -z "${6:-}" ] || spool="$6
"
  {
    printf '%s' "$server"
    cat <<TOML
[[listen]]
protocol = "smtp"
address = "127.0.0.1:$2"
[[mailbox]]
name = "incoming"
address = "incoming+%{key}@$domain"
[limits]
max_connections_per_ip = 1000
[spool]
dir = "$1/spool"
${spool}[http]
listen = "127.0.0.1:$3"
[auth]
$auth
TOML
    if [ $# -ge 7 ]; then printf '%s\n' "$7"; fi
  } > "$1/mailgate.toml"
}
