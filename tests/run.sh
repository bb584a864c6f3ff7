#!/usr/bin/env bash
# The whole test suite: toolchain bootstrap, lint gates, unit + privileged integration
# tests (real namespaces, veths, traffic; needs root). Usage: bash tests/run.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "tests/run.sh: the privileged tests need root" >&2
  exit 1
fi

bash tests/setup.sh

# aya-build relays every line of the nested eBPF cargo build as a cargo warning; drop
# those. pipefail keeps cargo's exit status.
quiet_aya_build() { grep -v '^warning: egress-deny-datapath@' || true; }

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build (binaries the integration tests execute)"
cargo build --workspace --bins --quiet 2>&1 | quiet_aya_build
echo "== cargo test"
cargo test --workspace --no-fail-fast "$@" 2>&1 | quiet_aya_build
