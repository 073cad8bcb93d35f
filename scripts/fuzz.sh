#!/usr/bin/env bash
# Fuzzes every target of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each (default 60).
#
#   scripts/fuzz.sh [SECONDS]            all targets, one after the other
#   FUZZ_TARGETS="session policy" scripts/fuzz.sh 600
#   FUZZ_GROW_CORPUS=1 scripts/fuzz.sh    new interesting inputs go into fuzz/corpus/<target>/
#                                         (otherwise into a scratch directory; the committed
#                                         corpus is only read)
#
# Works on stable rustc: cargo-fuzz passes nightly-only -Z flags, which RUSTC_BOOTSTRAP=1 allows.
# Installs cargo-fuzz when it is missing. Exits non-zero if any target crashed, timed out or ran
# out of memory, after printing the path of every crashing input (fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
targets=(${FUZZ_TARGETS:-session address headers reply policy})
cargo_fuzz_version=0.13.2
# No sanitizer: mailgate is safe Rust (ASan would halve the speed for little); debug assertions
# and overflow checks on, so arithmetic overflows are crashes too.
build_flags=(--sanitizer none --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed; running cargo install --locked cargo-fuzz@$cargo_fuzz_version (a few minutes)" >&2
    cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
export RUSTC_BOOTSTRAP=1

echo "fuzz.sh: building ${#targets[@]} targets" >&2
cargo fuzz build "${build_flags[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    stamp="$scratch/stamp-$t"
    touch "$stamp"
    if [[ ${FUZZ_GROW_CORPUS:-0} == 1 ]]; then
        corpora=("fuzz/corpus/$t")
    else
        mkdir -p "$scratch/$t"
        corpora=("$scratch/$t" "fuzz/corpus/$t")
    fi
    echo "fuzz.sh: $t for ${seconds}s" >&2
    if ! cargo fuzz run "${build_flags[@]}" "$t" "${corpora[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1; then
        failed+=("$t")
        echo "fuzz.sh: $t FAILED; crashing input(s):" >&2
        find "fuzz/artifacts/$t" -type f -newer "$stamp" -printf '  %p\n' >&2
        echo "  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $t <file>" >&2
        echo "  then save it under fuzz/regressions/$t/ (see fuzz/README.md)" >&2
    fi
done
if ((${#failed[@]})); then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]} (${seconds}s each)" >&2
