#!/usr/bin/env bash
# Idempotent toolchain bootstrap for a fresh Debian 12 machine (root).
# Installs: apt packages for tests/benchmarks, nightly rust-src, bpf-linker built
# against the nightly rustc's own LLVM. Returns in seconds when all is present.
set -euo pipefail

log() { echo "setup: $*" >&2; }

APT_PKGS=(
  iproute2 iputils-ping iperf3 bpftool clang llvm
  containernetworking-plugins golang-go golang-github-appc-cni-dev
  ipset iptables socat ncat procps psmisc kmod
  podman runc file curl python3-venv strace
  prometheus  # promtool: conf/kubernetes/prometheusrule.yaml (check rules, test rules)
)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "installing rust-src for nightly"
  # Add the component to the nightly that is there; installing "nightly" anew would
  # move it to a different rustc/LLVM than the one the rest of the machine expects.
  if ! rustup run nightly rustc -V >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
  fi
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker must link against the same LLVM major as the nightly rustc that emits
# the eBPF bitcode, so build it against that rustc's shipped libLLVM.
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
stamp="$HOME/.cargo/bin/.bpf-linker-llvm-$llvm_major"
if ! command -v bpf-linker >/dev/null 2>&1 || [[ ! -e "$stamp" ]]; then
  sysroot=$(rustc +nightly --print sysroot)
  libllvm=$(ls "$sysroot"/lib/libLLVM.so.*-rust-* | head -n1)
  # Kept after the build: bpf-linker resolves libLLVM from here at run time.
  prefix="$HOME/.cargo/bpf-linker-llvm"
  rm -rf "$prefix"
  mkdir -p "$prefix/lib"
  ln -s "$libllvm" "$prefix/lib/libLLVM.so"
  ln -s "$libllvm" "$prefix/lib/$(basename "$libllvm")"
  log "building bpf-linker against $libllvm (llvm-$llvm_major, ~1 min)"
  LLVM_PREFIX="$prefix" cargo +stable install --locked --force bpf-linker \
    --no-default-features --features "llvm-$llvm_major" >&2
  touch "$stamp"
fi

# --- packaging tests (tests/tests/packaging_*.rs): manifest validation -----------------
# Offline Kubernetes schemas and a security scan, in a private venv. Pinned: a new
# checkov release adds checks, a new kubernetes-validate a new default Kubernetes version;
# bump them deliberately. `kubectl kustomize` renders the kustomizations: kubectl comes
# with this machine kind (Debian's kubernetes-client 1.20 is too old for `patches`).
VENV=/opt/egress-deny-venv
VENV_PKGS=(kubernetes-validate==1.37.0 checkov==3.3.30)
VENV_STAMP="$VENV/.egress-deny-$(echo "${VENV_PKGS[*]}" | tr ' =' '_-')"
if [[ ! -e $VENV_STAMP || ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/checkov ]]; then
  log "installing ${VENV_PKGS[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${VENV_PKGS[@]}" >&2
  touch "$VENV_STAMP"
fi
command -v kubectl >/dev/null 2>&1 || log "WARNING: kubectl missing: the packaging tests render kustomizations with it"
# --- end packaging tests ----------------------------------------------------------------

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
log "ok"
