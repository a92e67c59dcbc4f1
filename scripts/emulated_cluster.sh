#!/usr/bin/env bash
# Run a torchrun job on an emulated multi-node CPU cluster on this one machine: N "nodes" x G
# ranks per node, every node a Linux network namespace.
#
# Why: on one host gloo all-to-all over loopback is nearly free next to compute, so the CPU stand-in
# has no node boundary and static SP (every sequence in a group spanning all nodes) pays no more
# than FlexSP's node-local groups. Real clusters have fast links inside a node and slower ones
# between nodes; this script builds exactly that, with real (kernel) packets:
#   * inside a node, ranks talk over the namespace's own loopback (fast, unshaped);
#   * every node has one veth "NIC" (eth0, 10.77.0.(i+1)/24) into a bridge in a switch namespace;
#     both directions of every NIC are rate-limited with tc tbf (--link-mbit), optionally with
#     netem delay (--latency-ms), so inter-node traffic is slow and shared by the node's ranks.
# One `torchrun --nnodes N --node-rank i --nproc-per-node G --rdzv-backend c10d` runs per namespace
# (GLOO_SOCKET_IFNAME=eth0, so gloo binds the node's NIC address; same-node peers reach that
# address through loopback). The namespaces are always removed on exit.
#
#   bash scripts/emulated_cluster.sh [options] [--] [pretrain_gpt_flexsp.py flags ...]
#   bash scripts/emulated_cluster.sh [options] -- -m megatron.flexsp.training.profiler [flags ...]
#   bash scripts/emulated_cluster.sh --check        (exit 0 if the machine can emulate, else 2)
#
# Options: --nodes N (2), --gpus-per-node G (2; "GPU" = one CPU rank), --link-mbit M (200),
# --latency-ms L (0), --timeout S (1800, for the whole job), --port P (29555).
# Environment: PYTHON (default .venv/bin/python, else python3).
# Needs root, iproute2 (ip, tc) and network-namespace support; otherwise it exits with code 2 and
# says why (callers then run on one host). Exit code: 0 if every node's torchrun succeeded, 124 on
# timeout, else the first failing node's code.
set -uo pipefail
cd "$(dirname "$0")/.."

NODES=2; GPN=2; MBIT=200; LAT=0; TIMEOUT=1800; PORT=29555; CHECK=0
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "emulated_cluster: $*" >&2; exit 1; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) posint "$1" "${2:-}"; NODES=$2; shift 2 ;;
    --gpus-per-node) posint "$1" "${2:-}"; GPN=$2; shift 2 ;;
    --link-mbit) posint "$1" "${2:-}"; MBIT=$2; shift 2 ;;
    --latency-ms) [[ "${2:-}" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--latency-ms must be a number >= 0, got '${2:-}'"
                  LAT=$2; shift 2 ;;
    --timeout) posint "$1" "${2:-}"; TIMEOUT=$2; shift 2 ;;
    --port) posint "$1" "${2:-}"; PORT=$2; shift 2 ;;
    --check) CHECK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ "$NODES" -le 200 ] || die "--nodes $NODES: at most 200 nodes fit the 10.77.0.0/24 addresses"

unavailable() { echo "emulated_cluster: cannot emulate nodes on this machine: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || unavailable "needs root (network namespaces and tc); run as root or run on one host"
command -v ip >/dev/null || unavailable "'ip' (iproute2) not found"
command -v tc >/dev/null || unavailable "'tc' (iproute2) not found"
command -v timeout >/dev/null || unavailable "'timeout' (coreutils) not found"

ID="fx$$"                    # unique per invocation: concurrent runs never share a namespace
SW="$ID-sw"
ns_of() { echo "$ID-n$1"; }
TMP=$(mktemp -d)
PIDS=()

teardown() {
  local p ns
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$p" 2>/dev/null; done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$ID-"); do
    # processes still inside our namespaces were started by this script
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$TMP"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

shape() {  # shape <netns> <dev>: rate limit (and delay) the device's egress
  local ns=$1 dev=$2 burst
  burst=$(( MBIT * 1000000 / 8 / 250 ))            # 4 ms of line rate, at least 64 KiB (GSO packets)
  [ "$burst" -ge 65536 ] || burst=65536
  if [ "$LAT" != 0 ]; then
    tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "${LAT}ms" limit 100000 &&
      tc -n "$ns" qdisc add dev "$dev" parent 1: handle 2: tbf rate "${MBIT}mbit" burst "$burst" latency 200ms
  else
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "${MBIT}mbit" burst "$burst" latency 200ms
  fi
}

build() {
  ip netns add "$SW" || return 1
  ip -n "$SW" link set lo up &&
    ip -n "$SW" link add br0 type bridge &&
    ip -n "$SW" link set br0 up || return 1
  local i ns
  for ((i = 0; i < NODES; i++)); do
    ns=$(ns_of $i)
    ip netns add "$ns" &&
      ip link add "$ID-a$i" type veth peer name "$ID-b$i" &&
      ip link set "$ID-a$i" netns "$ns" &&
      ip link set "$ID-b$i" netns "$SW" &&
      ip -n "$ns" link set "$ID-a$i" name eth0 &&
      ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0 &&
      ip -n "$ns" link set lo up &&
      ip -n "$ns" link set eth0 up &&
      ip -n "$SW" link set "$ID-b$i" master br0 &&
      ip -n "$SW" link set "$ID-b$i" up &&
      shape "$ns" eth0 &&              # node -> switch
      shape "$SW" "$ID-b$i" || return 1   # switch -> node
  done
}

if ! build 2>"$TMP/build.err"; then
  unavailable "setting up namespaces/veth/bridge/tc failed: $(tr '\n' ' ' < "$TMP/build.err")"
fi
if [ "$CHECK" = 1 ]; then
  echo "emulated_cluster: OK ($NODES nodes x $GPN ranks, ${MBIT} Mbit/s links, ${LAT} ms latency can be built here)"
  exit 0
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PYTHON=$(command -v "$PYTHON" || echo "$PYTHON")
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac
# program: pretrain_gpt_flexsp.py unless the caller names a script or -m module first
if [ $# -eq 0 ] || [[ "$1" == --* ]]; then set -- pretrain_gpt_flexsp.py "$@"; fi

echo "emulated cluster: $NODES nodes x $GPN ranks, inter-node links ${MBIT} Mbit/s each way" \
     "(tc tbf), latency ${LAT} ms, intra-node loopback; namespaces $ID-*"
for ((i = 0; i < NODES; i++)); do
  ns=$(ns_of $i)
  (
    timeout --kill-after=15 "$TIMEOUT" ip netns exec "$ns" env GLOO_SOCKET_IFNAME=eth0 \
      "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node-rank "$i" --nproc-per-node "$GPN" \
      --rdzv-backend c10d --rdzv-endpoint "10.77.0.1:$PORT" --rdzv-id "$ID" --rdzv-conf "is_host=$([ "$i" = 0 ] && echo 1 || echo 0)" \
      --local-addr "10.77.0.$((i + 1))" \
      "$@" 2>&1 | sed -u "s/^/[node$i] /"
    echo "${PIPESTATUS[0]}" > "$TMP/rc.$i"
  ) &
  PIDS+=($!)
done
rc=0
for ((i = 0; i < NODES; i++)); do
  wait "${PIDS[$i]}"
  r=$(cat "$TMP/rc.$i" 2>/dev/null || echo 1)
  if [ "$r" != 0 ]; then
    echo "emulated_cluster: node $i exited with code $r" >&2
    [ "$rc" != 0 ] || rc=$r
  fi
done
PIDS=()
exit "$rc"
