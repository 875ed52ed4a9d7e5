#!/usr/bin/env bash
# A two-node Ray cluster on one machine, without Docker: a head on 127.0.0.2 and a second node on
# 127.0.0.3 (both loopback addresses; Ray rewrites 127.0.0.1 into the machine's interface address,
# other loopback addresses are kept), as separate processes, with Ray's token authentication on.
# Each node offers one CPU, so a 2-worker Ray Train job must put one worker on each node.
#
#   docker/two-node-ray.sh start [PORT]   # prints the export lines a driver needs
#   docker/two-node-ray.sh stop
#
# Drivers connect with: ray.init(address="127.0.0.2:PORT", _node_ip_address="127.0.0.2") and the
# same RAY_AUTH_MODE / RAY_AUTH_TOKEN in their environment.
set -euo pipefail
cmd=${1:-start}
port=${2:-6391}
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
state=${TWO_NODE_STATE:-/tmp/robust-ensembles-two-node}

case "$cmd" in
  start)
    mkdir -p "$state"
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
    echo "$RAY_AUTH_TOKEN" > "$state/token"
    "$RAY" start --head --node-ip-address 127.0.0.2 --port "$port" --num-cpus 1 \
      --resources '{"node_head": 1}' --temp-dir "$state/ray" --disable-usage-stats >"$state/head.log" 2>&1
    "$RAY" start --address "127.0.0.2:$port" --node-ip-address 127.0.0.3 --num-cpus 1 \
      --resources '{"node_second": 1}' --disable-usage-stats >"$state/node.log" 2>&1
    echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN RAY_ADDRESS=127.0.0.2:$port"
    ;;
  stop)
    # Only this cluster's processes (both nodes run under "$state/ray/"); `ray stop` would end every
    # Ray on the machine, other sessions' included. Workers exit when their raylet does.
    pkill -TERM -f -- "$state/ray/" 2>/dev/null || true
    for _ in $(seq 20); do pgrep -f -- "$state/ray/" >/dev/null || break; sleep 0.5; done
    pkill -KILL -f -- "$state/ray/" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
