#!/usr/bin/env bash
# Stops the `fsb up` that deploy/local/quickstart.sh started: SIGTERM (fsb up drains,
# keeps or stops its sandboxes as configured, and stops its private containerd), then
# waits; SIGKILL only if it is still there after FSB_STOP_TIMEOUT seconds (default 60).
#
#   bash deploy/local/stop.sh
#
# Environment: FSB_DATA_DIR (default /var/lib/fast-sandbox), FSB_STOP_TIMEOUT.
set -euo pipefail

FSB_DATA_DIR="${FSB_DATA_DIR:-/var/lib/fast-sandbox}"
PID_FILE="$FSB_DATA_DIR/fsb-up.pid"
STOP_TIMEOUT="${FSB_STOP_TIMEOUT:-60}"

say() { echo "==> $*" >&2; }

pid="$(cat "$PID_FILE" 2>/dev/null || true)"
if [[ ! "$pid" =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then
  say "fsb up is not running (no live pid in $PID_FILE)"
  rm -f "$PID_FILE"
  exit 0
fi
if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE '(^|/)fsb up( |$)'; then
  say "pid $pid in $PID_FILE is not an fsb up; leaving it alone"
  rm -f "$PID_FILE"
  exit 0
fi

say "stopping fsb up (pid $pid)"
kill -TERM "$pid"
deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$pid" 2>/dev/null; do
  if ((SECONDS >= deadline)); then
    say "fsb up did not stop within ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
rm -f "$PID_FILE"
say "stopped"
