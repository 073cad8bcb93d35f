#!/usr/bin/env bash
# Makes sure the system tools the tests and benchmarks use are installed.
# As root it installs what is missing with apt-get and says so; otherwise it stops with the
# exact command to run. It never lets a test be skipped silently.
#   usage: scripts/ensure-packages.sh COMMAND=PACKAGE ...   e.g. swaks=swaks smtp-source=postfix
#   (COMMAND may be perl:Module::Name for a Perl module)
set -euo pipefail

missing_pkgs=()
for pair in "$@"; do
  cmd=${pair%%=*}
  pkg=${pair#*=}
  if [[ $cmd == perl:* ]]; then
    # a Perl module (swaks needs Net::SSLeay for TLS)
    perl -M"${cmd#perl:}" -e 1 >/dev/null 2>&1 || missing_pkgs+=("$pkg")
  elif ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing_pkgs+=("$pkg")
  fi
done
[ ${#missing_pkgs[@]} -eq 0 ] && exit 0

# de-duplicate
mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
cmdline="apt-get install -y ${missing_pkgs[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "mailgate: the tests need: ${missing_pkgs[*]}. Install them as root:" >&2
  echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive $cmdline" >&2
  exit 1
fi
echo "mailgate: installing missing test packages: ${missing_pkgs[*]} (apt-get, as root)" >&2
# Postfix must not configure itself as the system's mail server.
echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "${missing_pkgs[@]}" >&2
