#!/usr/bin/env bash
# Runs every fuzz target for a short while (default 15 s each) from the committed corpus, as
# .ci/run does; `fuzz/smoke.sh 600` is the ten-minute run per target. New inputs go to a
# scratch directory, never into fuzz/corpus/ (merge them by hand with `cargo fuzz cmin`).
# Needs cargo-fuzz; the stable toolchain runs it with RUSTC_BOOTSTRAP=1 (its -Z flags).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-15}"
sanitizer="${FUZZ_SANITIZER:-none}"
# FUZZ_DEV=1: unoptimized build (compiles in about half the time; for short smoke runs).
build_flags=()
[ "${FUZZ_DEV:-0}" = 1 ] && build_flags+=(--dev)
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing: cargo-fuzz (crates.io)"
  CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install --quiet --locked cargo-fuzz
fi
targets=$(cargo fuzz list)
cargo fuzz build "${build_flags[@]}" -s "$sanitizer"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  mkdir -p "$scratch/$t" "corpus/$t"
  echo "fuzz: $t for ${secs}s"
  # -rss_limit_mb: a target's memory must stay bounded; -timeout: no input may take 10 s.
  status=0
  cargo fuzz run "${build_flags[@]}" -s "$sanitizer" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb|new_units_added)" "$scratch/$t.log" \
    | tr '\n' ' ' || true
  echo
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "fuzz: $t failed (input saved under fuzz/artifacts/$t/)" >&2
    exit 1
  fi
done
