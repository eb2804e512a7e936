# shellcheck shell=bash
# A tiny test runner for the end-to-end suites: each test is a function; a failing
# command inside it fails the test; the summary line is "N passed, N failed".

E2E_PASSED=0
E2E_FAILED=0
E2E_FAILURES=()

fail() { echo "    FAIL: $*" >&2; return 1; }

# Runs test function $1 in a subshell with errexit, so any failing command fails it.
run_test() {
  local name=$1 started
  started=$(date +%s)
  echo "--- $name"
  if [ -n "${E2E_ONLY:-}" ] && ! [[ $name =~ $E2E_ONLY ]]; then
    echo "    skipped (E2E_ONLY)"; return 0
  fi
  # Not inside `if`, `||` or `&&`: errexit is ignored there, even in a subshell.
  # (The caller must not run with `set -e`.)
  local rc
  ( set -eEuo pipefail; trap 'echo "    at line $LINENO: $BASH_COMMAND" >&2' ERR; "$name" )
  rc=$?
  if [ "$rc" -eq 0 ]; then
    E2E_PASSED=$((E2E_PASSED + 1)); echo "    ok ($(( $(date +%s) - started ))s)"
  else
    E2E_FAILED=$((E2E_FAILED + 1)); E2E_FAILURES+=("$name"); echo "    FAILED ($(( $(date +%s) - started ))s)"
  fi
}

summary() {
  local suite=$1
  echo
  [ "${#E2E_FAILURES[@]}" -eq 0 ] || printf '%s failed: %s\n' "$suite" "${E2E_FAILURES[*]}"
  echo "$suite: $E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" -eq 0 ]
}

# retry N CMD...: retries CMD every 0.2 s, N times.
retry() {
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.2; done
  "$@"
}
