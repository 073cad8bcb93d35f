# Helpers for a private Postfix instance (root; its own config and queue directories under a
# temp dir, loopback high port), shared by scripts/bench-postfix.sh and scripts/bench-matrix.sh.
# Source it after `cd` to the repository root. The caller provides:
#   DOMAIN    the domain Postfix relays (relay_domains) and the transport maps route
#   pf_dirs   an array (pf_dirs=()): pf_start appends each instance's DIR, pf_stop removes it;
#             the caller's EXIT trap runs pf_stop_all on whatever is left
#   TIMEOUT   seconds poll_discard waits
# Only functions are defined here; nothing runs.

alive() { [ -e "/proc/$1" ] && ! grep -qE '^[^)]*\) [ZX]' "/proc/$1/stat" 2>/dev/null; }

# --- a private Postfix ----------------------------------------------------------------------

main_cf_common() { # DIR -> the main.cf lines both setups share
  cat <<EOF
compatibility_level = 3.6
queue_directory = $1/queue
data_directory = $1/data
myhostname = postfix.test
mydomain = test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.2/32
relay_domains = $DOMAIN
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
maillog_file = $1/postfix.log
maillog_file_prefixes = /var, /dev/stdout, $1
EOF
}

# pf_start DIR SMTP_PORT EXTRA_MAIN_CF: config under DIR/conf, queue under DIR/queue; returns
# once the SMTP port accepts connections.
pf_start() {
  local d=$1 port=$2
  mkdir -p "$d/conf" "$d/queue"   # Postfix creates data_directory itself, owned by postfix
  chmod 755 "$d" "$d/conf" "$d/queue"
  { main_cf_common "$d"; printf '%s\n' "$3"; } > "$d/conf/main.cf"
  # Debian's master.cf with the public `smtp inet` service (and its -o lines) replaced by ours
  awk -v svc="127.0.0.1:$port inet n - n - - smtpd" '
    skip && /^[ \t]/ { next }
    { skip = 0 }
    $1 == "smtp" && $2 == "inet" { print svc; skip = 1; found = 1; next }
    { print }
    END { if (!found) exit 1 }' /etc/postfix/master.cf > "$d/conf/master.cf"
  postconf -c "$d/conf" -F '*/*/chroot = n'
  postfix -c "$d/conf" start-fg > "$d/start-fg.out" 2>&1 &
  echo $! > "$d/start-fg.pid"
  pf_dirs+=("$d")
  for _ in $(seq 1 600); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    alive "$(cat "$d/start-fg.pid")" || break
    sleep 0.05
  done
  echo "postfix did not start:" >&2; cat "$d/start-fg.out" "$d/postfix.log" >&2 2>/dev/null || true
  return 1
}

# pf_stop DIR: postfix stop, then SIGTERM (and SIGKILL after 10 s) to the master and the
# start-fg process, by PID.
pf_stop() {
  local d=$1 master="" child
  child=$(cat "$d/start-fg.pid" 2>/dev/null || true)
  [ -f "$d/queue/pid/master.pid" ] && master=$(tr -d ' \n' < "$d/queue/pid/master.pid")
  postfix -c "$d/conf" stop >/dev/null 2>&1 || true
  for p in $master $child; do alive "$p" && kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 200); do
    local any=0
    for p in $master $child; do alive "$p" && any=1; done
    [ $any = 0 ] && break
    sleep 0.05
  done
  for p in $master $child; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
  [ -n "$child" ] && wait "$child" 2>/dev/null || true
  local rest=()
  for x in "${pf_dirs[@]}"; do [ "$x" != "$d" ] && rest+=("$x"); done
  pf_dirs=("${rest[@]}")
}

pf_stop_all() { # pf_stop on every instance still in pf_dirs (the EXIT trap)
  local d
  for d in "${pf_dirs[@]:-}"; do [ -n "$d" ] && pf_stop "$d"; done
  return 0
}

# poll_discard LOG N: N `status=sent` lines from Postfix's discard agent (read incrementally)
poll_discard() {
  python3 - "$1" "$2" "$TIMEOUT" <<'PY'
import sys, time
path, n, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen, pos, rest, end = 0, 0, b"", time.time() + limit
while time.time() < end:
    try:
        with open(path, "rb") as f:
            f.seek(pos); data = f.read(); pos += len(data)
    except FileNotFoundError:
        data = b""
    lines = (rest + data).split(b"\n"); rest = lines.pop()
    seen += sum(1 for l in lines if b"/discard[" in l and b" status=sent " in l)
    if seen >= n:
        print(f"{time.time():.6f} {seen}"); sys.exit(0)
    time.sleep(0.02)
print(f"nan {seen}"); sys.exit(1)
PY
}
