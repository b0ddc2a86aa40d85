#!/bin/sh
# Container entrypoint: runs `arbiter "$@"`, first mapping LeaderWorkerSet's variables onto
# arbiter's multi-node rendezvous settings, so one pod template serves leader and workers alike.
#
#   LWS_GROUP_SIZE      -> ARBITER_NODES        (pods in the group, leader included)
#   LWS_WORKER_INDEX    -> ARBITER_NODE_RANK    (0 on the leader)
#   LWS_LEADER_ADDRESS  -> ARBITER_LEADER_ADDR  (host name; the port is ARBITER_RENDEZVOUS_PORT, 29500)
#
# A variable already set in the pod spec wins over the mapping. Outside a LeaderWorkerSet nothing
# is mapped. ARBITER_BIN overrides the binary (deploy/tests use it; the image never sets it).
set -eu

if [ -n "${LWS_LEADER_ADDRESS:-}" ] || [ -n "${LWS_GROUP_SIZE:-}" ] || [ -n "${LWS_WORKER_INDEX:-}" ]; then
    if [ -z "${LWS_LEADER_ADDRESS:-}" ] || [ -z "${LWS_GROUP_SIZE:-}" ] || [ -z "${LWS_WORKER_INDEX:-}" ]; then
        echo "arbiter-entrypoint: LWS_LEADER_ADDRESS='${LWS_LEADER_ADDRESS:-}' LWS_GROUP_SIZE='${LWS_GROUP_SIZE:-}'" \
            "LWS_WORKER_INDEX='${LWS_WORKER_INDEX:-}': a LeaderWorkerSet sets all three" >&2
        exit 2
    fi
    case "$LWS_GROUP_SIZE$LWS_WORKER_INDEX" in
        *[!0-9]*)
            echo "arbiter-entrypoint: LWS_GROUP_SIZE=$LWS_GROUP_SIZE and LWS_WORKER_INDEX=$LWS_WORKER_INDEX must be whole numbers" >&2
            exit 2
            ;;
    esac
    port="${ARBITER_RENDEZVOUS_PORT:-29500}"
    : "${ARBITER_NODES:=$LWS_GROUP_SIZE}"
    : "${ARBITER_NODE_RANK:=$LWS_WORKER_INDEX}"
    : "${ARBITER_LEADER_ADDR:=$LWS_LEADER_ADDRESS:$port}"
    export ARBITER_NODES ARBITER_NODE_RANK ARBITER_LEADER_ADDR
fi

exec "${ARBITER_BIN:-/usr/local/bin/arbiter}" "$@"
