#!/usr/bin/env bash
# Runs the comparison benchmark (examples/compare.rs) on a fresh Debian machine: installs
# redis-server from Debian's packages if it is missing, starts it on loopback with no
# persistence, runs the benchmark in release mode against it (writing BENCHMARKS.md), and stops
# Redis afterwards. Extra arguments go to the benchmark (for example --rounds 3 --millis 1000).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PEERGRID_COMPARE_REDIS_PORT:-6390}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version

echo "== starting redis-server on 127.0.0.1:${PORT}"
redis-server --bind 127.0.0.1 --port "${PORT}" --save '' --appendonly no \
  --protected-mode yes --daemonize no --loglevel warning &
REDIS_PID=$!
trap 'kill "${REDIS_PID}" 2>/dev/null || true; wait "${REDIS_PID}" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if redis-cli -p "${PORT}" ping >/dev/null 2>&1; then break; fi
  sleep 0.1
done
redis-cli -p "${PORT}" ping

echo "== benchmark (release build)"
cargo run --release --quiet --example compare -- --redis "127.0.0.1:${PORT}" --out BENCHMARKS.md "$@"
