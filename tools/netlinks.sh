#!/usr/bin/env bash
# Real, shaped links for a pipeline on one machine: a chain of network namespaces joined by veth pairs,
# each link shaped with tc tbf (netem is not needed and not used). Needs root and iproute2.
#
#   tools/netlinks.sh up N RATE_MBIT [BURST_BYTES]     build namespaces n0..n{N-1}, links 0..N-2 at RATE
#   tools/netlinks.sh rate N LINK RATE_MBIT [BURST]    change the rate of link LINK (0..N-2)
#   tools/netlinks.sh schedule N LINK SCHEDULE [BURST] apply "0:500,20:50,40:250" (s:Mbit/s) in the foreground
#   tools/netlinks.sh status N                         print the qdiscs (rate, bytes sent, drops)
#   tools/netlinks.sh down N                           delete everything this prefix created
#
# Layout (PREFIX from $QP_NS_PREFIX, default "qp"; names stay under the 15-character interface limit):
#   namespace ${PREFIX}n{k} runs stage k; link i joins ${PREFIX}n{i} (10.77.i.1, device ${PREFIX}l{i}a)
#   and ${PREFIX}n{i+1} (10.77.i.2, device ${PREFIX}l{i}b). Data flows downstream, so the tbf qdisc sits
#   on the upstream device (egress of ${PREFIX}l{i}a); acks flow back unshaped. Every namespace has its
#   own loopback up, so the source (in n0) and the sink (in the last namespace) use 127.0.0.1.
#
# 'quantpipe run --shaping netns' calls this script; so can an operator reproducing an experiment.
set -euo pipefail

PREFIX="${QP_NS_PREFIX:-qp}"
LATENCY="${QP_TBF_LATENCY:-200ms}"   # queueing the qdisc may add before it drops (TCP backs off first)

die() { echo "netlinks.sh: $*" >&2; exit 1; }
ns() { echo "${PREFIX}n$1"; }
dev() { echo "${PREFIX}l$1$2"; }
need_int() { [[ "$1" =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '$1'"; }
need_rate() { [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "rate must be a number of Mbit/s, got '$1'"; }

shape() {  # shape LINK RATE BURST: create or change the tbf qdisc of link LINK
    local link=$1 rate=$2 burst=$3
    need_rate "$rate"
    need_int "$burst" "burst"
    ip netns exec "$(ns "$link")" tc qdisc replace dev "$(dev "$link" a)" root tbf \
        rate "${rate}mbit" burst "$burst" latency "$LATENCY"
}

up() {
    local n=$1 rate=$2 burst=${3:-32768}
    need_int "$n" "N"
    (( n >= 1 )) || die "N must be >= 1"
    [[ $(id -u) == 0 ]] || die "needs root (ip netns, tc)"
    down "$n" 2>/dev/null || true
    for ((k = 0; k < n; k++)); do
        ip netns add "$(ns "$k")"
        ip -n "$(ns "$k")" link set lo up
    done
    for ((i = 0; i + 1 < n; i++)); do
        ip link add "$(dev "$i" a)" netns "$(ns "$i")" type veth peer name "$(dev "$i" b)" netns "$(ns $((i + 1)))"
        ip -n "$(ns "$i")" addr add "10.77.$i.1/24" dev "$(dev "$i" a)"
        ip -n "$(ns $((i + 1)))" addr add "10.77.$i.2/24" dev "$(dev "$i" b)"
        ip -n "$(ns "$i")" link set "$(dev "$i" a)" up
        ip -n "$(ns $((i + 1)))" link set "$(dev "$i" b)" up
        shape "$i" "$rate" "$burst"
    done
}

down() {
    local n=$1
    need_int "$n" "N"
    for ((k = 0; k < n; k++)); do
        ip netns del "$(ns "$k")" 2>/dev/null || true  # deleting a namespace deletes its veth ends
    done
}

schedule() {
    local n=$1 link=$2 sched=$3 burst=${4:-32768} start now t rate
    need_int "$link" "LINK"
    (( link + 1 < n )) || die "link $link does not exist in a chain of $n namespaces"
    start=$(date +%s.%N)
    IFS=',' read -ra steps <<< "$sched"
    for step in "${steps[@]}"; do
        t=${step%%:*}
        rate=${step##*:}
        now=$(date +%s.%N)
        sleep "$(awk -v s="$start" -v t="$t" -v n="$now" 'BEGIN { d = s + t - n; print (d > 0 ? d : 0) }')"
        shape "$link" "$rate" "$burst"
        echo "t=${t}s link $link: ${rate} Mbit/s"
    done
}

cmd=${1:-}
shift || true
case "$cmd" in
    up) [[ $# -ge 2 ]] || die "usage: up N RATE_MBIT [BURST]"; up "$@" ;;
    rate) [[ $# -ge 3 ]] || die "usage: rate N LINK RATE_MBIT [BURST]"
          (( $2 + 1 < $1 )) || die "link $2 does not exist in a chain of $1 namespaces"
          shape "$2" "$3" "${4:-32768}" ;;
    schedule) [[ $# -ge 3 ]] || die "usage: schedule N LINK SCHEDULE [BURST]"; schedule "$@" ;;
    status) [[ $# -ge 1 ]] || die "usage: status N"
            for ((i = 0; i + 1 < $1; i++)); do ip netns exec "$(ns "$i")" tc -s qdisc show dev "$(dev "$i" a)"; done ;;
    down) [[ $# -ge 1 ]] || die "usage: down N"; down "$1" ;;
    *) die "usage: netlinks.sh up|rate|schedule|status|down ... (see the header of this script)" ;;
esac
