#!/usr/bin/env bash
# fast-sandbox local mode from a fresh Debian 12 machine, as root, in one command:
#
#   bash deploy/local/quickstart.sh
#
# 1. installs the Debian packages `fsb up` needs if missing (containerd, runc, crun,
#    runsc, busybox-static, protoc, build tools, curl);
# 2. installs Rust with rustup (non-interactive, stable) if cargo is missing;
# 3. builds `fsb` (cargo build --release -p fsb-bin) and a static `fsb-init` beside it;
# 4. starts `fsb up` in the background (log and pid file in the data directory), or
#    reuses the one already running, and waits until `fsb version` reaches it;
# 5. runs a first sandbox: `fsb run --rm -- echo hello`, then a named one, then `fsb ls`.
#
# `fsb up` keeps running afterwards; stop it with deploy/local/stop.sh.
#
# Environment:
#   FSB_DATA_DIR       data directory (default /var/lib/fast-sandbox)
#   CARGO_TARGET_DIR   cargo's target directory (default <repo>/target)
#   FSB_UP_TIMEOUT     seconds to wait for `fsb up` to answer (default 60)
#   FSB_SKIP_BUILD=1   use the fsb binary already built
#   FSB_SKIP_DEMO=1    stop after `fsb up` answers (no sample sandboxes)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export FSB_DATA_DIR="${FSB_DATA_DIR:-/var/lib/fast-sandbox}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
FSB="$TARGET_DIR/release/fsb"
PID_FILE="$FSB_DATA_DIR/fsb-up.pid"
LOG_FILE="$FSB_DATA_DIR/fsb-up.log"
UP_TIMEOUT="${FSB_UP_TIMEOUT:-60}"
RUST_MIN="1.89"

# Debian package and a file that shows it is installed.
PACKAGES=(
  containerd:/usr/bin/containerd
  runc:/usr/sbin/runc
  crun:/usr/bin/crun
  runsc:/usr/bin/runsc
  busybox-static:/bin/busybox
  protobuf-compiler:/usr/bin/protoc
  libprotobuf-dev:/usr/include/google/protobuf/descriptor.proto
  build-essential:/usr/bin/cc
  pkg-config:/usr/bin/pkg-config
  curl:/usr/bin/curl
  ca-certificates:/etc/ssl/certs/ca-certificates.crt
)

say() { echo "==> $*" >&2; }
die() { echo "quickstart: $*" >&2; exit 1; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "run me as root (fsb up drives containerd, which needs root)"
}

installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

ensure_packages() {
  local entry pkg file missing=()
  for entry in "${PACKAGES[@]}"; do
    pkg="${entry%%:*}"
    file="${entry#*:}"
    if ! installed "$pkg" && [[ ! -e "$file" ]]; then
      missing+=("$pkg")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "Debian packages: all present"
    return 0
  fi
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# True if version $1 >= $2 (dotted numbers).
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

ensure_cargo() {
  # rustup installs into ~/.cargo/bin, which a fresh shell may not have on PATH yet.
  if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null; then
    say "installing Rust (rustup, stable toolchain, minimal profile)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --profile minimal --default-toolchain stable
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  local have
  have="$(rustc --version | awk '{print $2}')"
  if ! version_ge "$have" "$RUST_MIN"; then
    if command -v rustup >/dev/null; then
      say "Rust $have is older than $RUST_MIN: rustup update stable"
      rustup update stable
    else
      die "Rust $have is older than $RUST_MIN and rustup is not installed: upgrade Rust"
    fi
  fi
  say "cargo: $(cargo --version)"
}

build() {
  if [[ "${FSB_SKIP_BUILD:-0}" == 1 ]]; then
    [[ -x "$FSB" ]] || die "FSB_SKIP_BUILD=1 but $FSB does not exist"
    return 0
  fi
  say "building fsb (cargo build --release -p fsb-bin; the first build takes a few minutes)"
  (cd "$REPO_ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -p fsb-bin)
  [[ -x "$FSB" ]] || die "the build did not produce $FSB"
  # fsb-init, static (PID 1 of warm instances, `fsb up --warm`), beside fsb.
  say "building fsb-init (static)"
  (cd "$REPO_ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo rustc -p fsb-init-bin --release \
    --bin fsb-init -- -C target-feature=+crt-static)
}

# The pid of a running `fsb up` of this data directory, if any.
running_pid() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  # A recycled pid is not ours: check it is an `fsb up`.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE '(^|/)fsb up( |$)' || return 0
  echo "$pid"
}

# `fsb ls` succeeds only once fsb up answers (`fsb version` also succeeds without it).
answers() { "$FSB" ls >/dev/null 2>&1; }

start_up() {
  mkdir -p "$FSB_DATA_DIR"
  chmod 0700 "$FSB_DATA_DIR"
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    say "fsb up already running (pid $pid); reusing it"
  else
    say "starting fsb up (log: $LOG_FILE)"
    [[ ! -f "$LOG_FILE" ]] || mv -f "$LOG_FILE" "$LOG_FILE.1"
    # setsid: its own session, so closing this terminal does not stop it.
    setsid "$FSB" up >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
  fi

  local deadline=$((SECONDS + UP_TIMEOUT))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "quickstart: fsb up exited; last lines of $LOG_FILE:" >&2
      tail -n 40 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "quickstart: fsb up (pid $pid) did not answer \`fsb version\` within ${UP_TIMEOUT}s; last lines of $LOG_FILE:" >&2
      tail -n 40 "$LOG_FILE" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  say "fsb up is running (pid $pid)"
  "$FSB" version
}

demo() {
  [[ "${FSB_SKIP_DEMO:-0}" == 1 ]] && return 0
  say "fsb run --rm -- echo hello"
  "$FSB" run --rm -- echo hello
  say "fsb run --name hello -- echo hello"
  if ! "$FSB" run --name hello -- echo hello; then
    # A rerun finds the sandbox of the previous run under that name.
    say "(a sandbox named hello exists already, from an earlier quickstart)"
  fi
  say "fsb ls"
  "$FSB" ls
}

main() {
  need_root
  ensure_packages
  ensure_cargo
  build
  start_up
  demo
  cat >&2 <<EOF

fast-sandbox is running in local mode.
  fsb:      $FSB
  data dir: $FSB_DATA_DIR (log: $LOG_FILE)
  try:      $FSB run --rm -- sh -c 'uname -a; id'
  stop:     bash $REPO_ROOT/deploy/local/stop.sh
EOF
}

# Sourcing the script (for tests) defines the functions without running them.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
