#!/usr/bin/env bash
# The egress-deny demo: a self-contained Kubernetes-like "node" on this machine.
#
# - a "node" network namespace whose default route leads to an "internet" namespace
#   that answers on a few addresses;
# - egress-deny-installer running in the node, fed a rules directory laid out the way
#   kubelet mounts a ConfigMap (..data symlink swap, a gzip key);
# - "pods" (network namespaces) created through a real CNI runtime (libcni) running the
#   node's conflist: reference bridge + host-local, then egress-deny (inserted by the
#   installer);
# - traffic from the pods and from the node itself, allowed and denied, the deny events,
#   `lookup`, `status` and /metrics; then a live rules update.
# Everything it creates is removed on exit. Needs root (run tests/setup.sh's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "demo.sh: needs root" >&2; exit 1; }

bash tests/setup.sh
echo "== building (release)"
cargo build --release --bins --quiet 2>&1 | { grep -v '^warning: egress-deny-datapath@' || true; }
BIN=$PWD/target/release
mkdir -p target/cni-driver
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=$PWD/target/cni-driver/gocache \
  go build -o target/cni-driver/cni-driver tests/cni-driver/main.go
DRIVER=$PWD/target/cni-driver/cni-driver

ID=$(od -An -N3 -tx1 /dev/urandom | tr -d " \n")
NODE=edemo-node-$ID
NET=edemo-net-$ID
PODS=(edemo-web-$ID edemo-batch-$ID)
ROOT=$(mktemp -d /tmp/egress-deny-demo.XXXXXX)
PIN=/sys/fs/bpf/egress-deny-demo-$ID
INSTALLER_PID=

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
in_node() { nsenter --net=/var/run/netns/$NODE "$@"; }
installer() { in_node "$BIN/egress-deny-installer" "$@" --pin-dir "$PIN" --state-dir "$ROOT/state"; }
cni() { # cni add|del <pod>
  CNI_PATH=$ROOT/bin:/usr/lib/cni CNI_CACHE_DIR=$ROOT/cache \
    in_node "$DRIVER" "$1" "$ROOT/net.d/10-bridge.conflist" "ctr-$2" "/var/run/netns/$2" eth0 \
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=${2%-$ID}"
}
try() { # try <label> <namespace> <destination>
  if ip netns exec "$2" ping -c 1 -W 1 "$3" >/dev/null 2>&1; then
    printf '  %-34s -> %-15s \033[32mreachable\033[0m\n' "$1" "$3"
  else
    printf '  %-34s -> %-15s \033[31mdropped\033[0m\n' "$1" "$3"
  fi
}
publish_rules() { # kubelet-style ConfigMap update: new dir, atomic ..data swap
  local stamp=..$(date +%s%N)
  mkdir "$ROOT/rules/$stamp"
  cp "$@" "$ROOT/rules/$stamp/"
  for f in "$@"; do ln -sfn "..data/$(basename "$f")" "$ROOT/rules/$(basename "$f")"; done
  ln -sfn "$stamp" "$ROOT/rules/..data_tmp" && mv -T "$ROOT/rules/..data_tmp" "$ROOT/rules/..data"
}
cleanup() {
  set +e
  for pod in "${PODS[@]}"; do cni del "$pod" >/dev/null 2>&1; ip netns del "$pod" 2>/dev/null; done
  [[ -n $INSTALLER_PID ]] && kill "$INSTALLER_PID" 2>/dev/null && wait "$INSTALLER_PID" 2>/dev/null
  installer uninstall --cni-conf-dir "$ROOT/net.d" --cni-bin-dir "$ROOT/bin" >/dev/null 2>&1
  ip netns del "$NODE" 2>/dev/null; ip netns del "$NET" 2>/dev/null
  rm -rf "$ROOT" "$PIN"
}
trap cleanup EXIT

bold "1. A node, and an 'internet' behind its default route"
ip netns add "$NODE"; ip netns add "$NET"
ip -n "$NODE" link set lo up; ip -n "$NET" link set lo up
ip -n "$NODE" link add eth0 type veth peer name eth0 netns "$NET"
ip -n "$NODE" addr add 100.64.0.1/24 dev eth0; ip -n "$NODE" link set eth0 up
ip -n "$NET" addr add 100.64.0.2/24 dev eth0; ip -n "$NET" link set eth0 up
ip -n "$NODE" route add default via 100.64.0.2
ip -n "$NET" route add 10.88.0.0/16 via 100.64.0.1
in_node sysctl -qw net.ipv4.ip_forward=1
for addr in 198.51.100.7 203.0.113.50 203.0.113.200 192.0.2.10; do ip -n "$NET" addr add $addr/32 dev lo; done
echo "  internet answers on 198.51.100.7 (threat feed), 203.0.113.50 and .200, 192.0.2.10 (partner API)"

mkdir -p "$ROOT"/{net.d,bin,rules,state,cache}
cat >"$ROOT/net.d/10-bridge.conflist" <<JSON
{ "cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
  { "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
    "ipam": { "type": "host-local", "subnet": "10.88.0.0/24", "routes": [{ "dst": "0.0.0.0/0" }],
              "dataDir": "$ROOT/ipam" } } ] }
JSON
printf '# threat feed (plain text key)\n198.51.100.0/24\n' >"$ROOT/threat-feed"
printf '# sanctioned ranges, with an exception\n203.0.113.0/24\n!203.0.113.128/25\n' | gzip >"$ROOT/sanctioned.gz"
publish_rules "$ROOT/threat-feed" "$ROOT/sanctioned.gz"
echo "  rules ConfigMap: threat-feed (198.51.100.0/24), sanctioned.gz (203.0.113.0/24 except !203.0.113.128/25)"

bold "2. egress-deny-installer run (the DaemonSet's daemon)"
# nsenter execs the daemon: $! is the daemon itself (for the SIGTERM at the end).
nsenter --net=/var/run/netns/$NODE "$BIN/egress-deny-installer" run --pin-dir "$PIN" --state-dir "$ROOT/state" \
  --cni-conf-dir "$ROOT/net.d" --cni-bin-dir "$ROOT/bin" --rules-dir "$ROOT/rules" \
  --listen 127.0.0.1:9765 --host-interfaces auto --plugin-binary "$BIN/egress-deny" \
  >"$ROOT/installer.log" 2>&1 &
INSTALLER_PID=$!
for _ in $(seq 100); do
  in_node curl -sf http://127.0.0.1:9765/readyz >/dev/null 2>&1 && break
  sleep 0.1
done
in_node curl -sf http://127.0.0.1:9765/readyz
sed 's/^/  | /' "$ROOT/installer.log"
echo "  conflist now:"; python3 -m json.tool "$ROOT/net.d/10-bridge.conflist" | sed 's/^/  | /' | grep -A4 '"egress-deny"\|"type": "bridge"' | head -12

bold "3. Pods through the CNI chain [bridge, egress-deny]"
for pod in "${PODS[@]}"; do
  ip netns add "$pod"
  cni add "$pod" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  ", sys.argv[1], "->", r["ips"][0]["address"])' "$pod"
done

bold "4. Traffic"
for pod in "${PODS[@]}"; do
  try "pod ${pod%-$ID}" "$pod" 192.0.2.10
  try "pod ${pod%-$ID}" "$pod" 198.51.100.7
  try "pod ${pod%-$ID}" "$pod" 203.0.113.50
  try "pod ${pod%-$ID} (exception)" "$pod" 203.0.113.200
done
try "the node itself (tc egress on eth0)" "$NODE" 198.51.100.7
try "the node itself" "$NODE" 192.0.2.10

bold "5. Why? egress-deny-installer lookup"
installer lookup 198.51.100.7 203.0.113.200 192.0.2.10 | sed 's/^/  /'

bold "6. Deny events in the daemon's log (rate-limited per pod)"
grep 'denied:' "$ROOT/installer.log" | head -6 | sed 's/^/  /'

bold "7. /metrics"
in_node curl -s http://127.0.0.1:9765/metrics | grep -E '^egress_deny_(rules|packets_total|attachments)' | grep -v ' 0$' | sed 's/^/  /'

bold "8. Live update: the partner range goes on the list (kubelet swaps ..data)"
printf '198.51.100.0/24\n192.0.2.0/24\n' >"$ROOT/threat-feed"
publish_rules "$ROOT/threat-feed" "$ROOT/sanctioned.gz"
for _ in $(seq 50); do installer lookup 192.0.2.10 | grep -q deny && break; sleep 0.1; done
grep 'rules synced' "$ROOT/installer.log" | tail -1 | sed 's/^/  /'
try "pod ${PODS[0]%-$ID}" "${PODS[0]}" 192.0.2.10

bold "9. status"
installer status | sed 's/^/  /'

bold "Cleaning up (CNI DEL, SIGTERM, uninstall)"
