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
echo "== static binaries for the container image (conf/Containerfile)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  --target x86_64-unknown-linux-gnu -p egress-deny -p egress-deny-installer 2>&1 | quiet_aya_build
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | quiet_aya_build | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary, the last of
# which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log" | sed 's/;//g'
exit "$status"
