#!/usr/bin/env bash
# The container path, end to end, on a machine with no registry and no Docker daemon:
#   1. install Docker Engine, Compose v1 and debootstrap from Debian's packages;
#   2. start a private Docker daemon (own root, socket and address pool, host iptables untouched);
#   3. make a Python base image with debootstrap, and download the wheels on the host;
#   4. build the image with --network none;
#   5. bring the compose stack up on free loopback ports;
#   6. run test_integration.py against it, faults included (stop/start/pause/unpause), then
#      its TLS part again with TLS on (docker-compose.tls.yml over it; tools/certs.py);
#   7. bring up the `ha` profile (etcd, six HA nodes, haproxy) from the same base, which
#      debootstrap gave etcd-server and haproxy, and run the failover tests against it
#      (SIGKILL and SIGTERM through `docker kill`, pause and etcd's stop through compose), and a
#      write through haproxy;
#   8. tear everything down, even when a step fails: containers, network, daemon (by PID).
#
# Usage: .ci/container-job.sh [path/to/python]   (default .venv/bin/python, made by `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
started=$(date +%s)
log() { echo "[container-job +$(( $(date +%s) - started ))s] $*"; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
    || ! command -v debootstrap >/dev/null; then
  log "installing docker.io, docker-compose and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
# Debian's client matches Debian's daemon; fall back to whichever docker is on PATH.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed

WORK=$(mktemp -d /tmp/kv-container-ci.XXXXXX)
export DOCKER_HOST="unix://$WORK/docker.sock"
PROJECT="kvci$$"
DAEMON_PID=""
# dockerd creates the docker0 bridge and leaves it behind; remove it only if it is ours.
had_docker0=false
{ ! command -v ip >/dev/null || ip link show docker0 >/dev/null 2>&1; } && had_docker0=true

cleanup() {
  local status=$?
  set +e
  log "tearing down (exit status $status)"
  if [ -n "$DAEMON_PID" ]; then
    if [ "$status" -ne 0 ]; then
      docker-compose -p "$PROJECT" --profile ha logs --no-color --tail 50 2>/dev/null | tail -n 160
    fi
    docker-compose -p "$PROJECT" --profile ha down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
    kill "$DAEMON_PID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  # Anything the daemon left mounted under its root must go before the folder does.
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
  [ "$had_docker0" = true ] || ip link delete docker0 2>/dev/null
  exit "$status"
}
trap cleanup EXIT

log "starting a private Docker daemon in $WORK"
mkdir -p "$WORK/data" "$WORK/exec"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" -H "$DOCKER_HOST" \
  --pidfile "$WORK/docker.pid" --iptables=false --ip-forward=false --ip-masq=false \
  --bip 10.213.0.1/24 --default-address-pool base=10.213.0.0/16,size=24 \
  >"$WORK/dockerd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 150); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
"$DOCKER" info >/dev/null || { tail -n 30 "$WORK/dockerd.log"; exit 1; }

log "making a Debian bookworm base image with debootstrap (no registry is needed)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,etcd-server,haproxy \
  bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
tar -C "$WORK/rootfs" -c . | "$DOCKER" import - kv-ci-base:bookworm >/dev/null
rm -rf "$WORK/rootfs"

log "downloading wheels on the host"
"$PYTHON" -m pip download --quiet --disable-pip-version-check -d wheels -r requirements.txt

log "building the image with no network"
"$DOCKER" build --quiet --network none --build-arg BASE=kv-ci-base:bookworm \
  -t replicated-kv:latest . >/dev/null
"$DOCKER" image ls replicated-kv:latest --format 'image replicated-kv:latest is {{.Size}}'

read -r LEADER_PORT FOLLOWER1_PORT FOLLOWER2_PORT FOLLOWER3_PORT FOLLOWER4_PORT FOLLOWER5_PORT \
  < <("$PYTHON" -c 'from tools.cluster import free_port; print(*(free_port() for _ in range(6)))')
export LEADER_PORT FOLLOWER1_PORT FOLLOWER2_PORT FOLLOWER3_PORT FOLLOWER4_PORT FOLLOWER5_PORT
export BASE=kv-ci-base:bookworm
# The ha profile's network, inside the private daemon's address pool. Compose creates it
# with the first `up`, so it is set before that one.
export HA_NET=10.213.242
export REPLICATION_SECRET="ci-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

log "docker-compose up: leader on 127.0.0.1:$LEADER_PORT, followers on $FOLLOWER1_PORT..$FOLLOWER5_PORT"
# The image is built already; compose's own build (BASE through build.args) is all cache hits.
docker-compose -p "$PROJECT" build --quiet
docker-compose -p "$PROJECT" up -d --no-build
followers=""
for port in $FOLLOWER1_PORT $FOLLOWER2_PORT $FOLLOWER3_PORT $FOLLOWER4_PORT $FOLLOWER5_PORT; do
  followers="${followers:+$followers,}http://127.0.0.1:$port"
done
"$PYTHON" -c "from tools.cluster import wait_healthy; wait_healthy(['http://127.0.0.1:$LEADER_PORT'], 120, path='/ready')"

log "running test_integration.py against the containers"
KV_LEADER_URL="http://127.0.0.1:$LEADER_PORT" KV_FOLLOWER_URLS="$followers" \
  KV_COMPOSE_PROJECT="$PROJECT" KV_COMPOSE_COMMAND=docker-compose \
  KV_REPLICATION_SECRET="$REPLICATION_SECRET" \
  timeout 900 "$PYTHON" -m pytest test_integration.py -p no:cacheprovider

# With TLS on, the part of the suite that TLS changes: every hop (client to node, leader to
# follower), the change feed's stream, the secret, and reconnecting after a follower's and
# the leader's restart. The rest is the same code over another transport, and the whole
# suite's second run cost about two minutes of CI's twenty.
TLS_TESTS="healthy or read_back or quorum_write or change_feed or replicate_requires"
TLS_TESTS="$TLS_TESTS or killed_follower_under_load or killed_leader"
log "the fixed stack again, with TLS on (docker-compose.tls.yml), and the suite's TLS part against it"
docker-compose -p "$PROJECT" down --volumes --timeout 5 >/dev/null
"$PYTHON" tools/certs.py --out "$WORK/certs" --readable-keys \
  leader follower1 follower2 follower3 follower4 follower5 client >/dev/null
export CERTS_DIR="$WORK/certs"
TLS_FILES="docker-compose.yml,docker-compose.tls.yml"
docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.tls.yml up -d --no-build
followers_tls=${followers//http:/https:}
KV_LEADER_URL="https://127.0.0.1:$LEADER_PORT" KV_FOLLOWER_URLS="$followers_tls" \
  KV_CACERT="$CERTS_DIR/ca.pem" KV_CLIENT_CERT="$CERTS_DIR/client.pem" \
  KV_CLIENT_KEY="$CERTS_DIR/client-key.pem" KV_COMPOSE_FILES="$TLS_FILES" \
  KV_COMPOSE_PROJECT="$PROJECT" KV_COMPOSE_COMMAND=docker-compose \
  KV_REPLICATION_SECRET="$REPLICATION_SECRET" \
  timeout 900 "$PYTHON" -m pytest test_integration.py -k "$TLS_TESTS" -p no:cacheprovider
"$PYTHON" - "$LEADER_PORT" "$CERTS_DIR" <<'PY'
import sys, httpx
port, certs = sys.argv[1], sys.argv[2]
try:
    httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
except httpx.TransportError:
    print("plain HTTP to the TLS leader is refused, as it should be")
else:
    sys.exit("the TLS leader answered plain HTTP")
PY

log "the ha profile: etcd, six HA nodes and haproxy, from the same base"
docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.tls.yml stop --timeout 5 \
  >/dev/null  # the fixed stack: its CPU back
read -r HA1_PORT HA2_PORT HA3_PORT HA4_PORT HA5_PORT HA6_PORT ETCD_PORT HAPROXY_PORT \
  < <("$PYTHON" -c 'from tools.cluster import free_port; print(*(free_port() for _ in range(8)))')
export HA1_PORT HA2_PORT HA3_PORT HA4_PORT HA5_PORT HA6_PORT ETCD_PORT HAPROXY_PORT
export ETCD_IMAGE=kv-ci-base:bookworm HAPROXY_IMAGE=kv-ci-base:bookworm
# Delays of 0..100 ms, as the local failover tests use: each test times a failover from
# before the command that delivers the fault (`docker kill` for SIGKILL and SIGTERM).
export MAX_DELAY_MS=100
docker-compose -p "$PROJECT" --profile ha up -d --no-build haproxy
nodes=""
ports=($HA1_PORT $HA2_PORT $HA3_PORT $HA4_PORT $HA5_PORT $HA6_PORT)
for i in 1 2 3 4 5 6; do
  nodes="${nodes:+$nodes,}ha$i=http://127.0.0.1:${ports[$((i - 1))]}"
done
"$PYTHON" - "$nodes" <<'PY'
import sys, time, httpx
from tools.cluster import ComposeHACluster, wait_healthy
nodes = dict(part.split("=", 1) for part in sys.argv[1].split(","))
wait_healthy(list(nodes.values()), 120)
print("leader:", ComposeHACluster("unused", nodes).wait_for_primary(60))
PY
log "a write through haproxy on 127.0.0.1:$HAPROXY_PORT"
"$PYTHON" - "$HAPROXY_PORT" <<'PY'
import sys, time, httpx
deadline = time.monotonic() + 30
while True:
    try:
        answer = httpx.post(f"http://127.0.0.1:{sys.argv[1]}/keys", json={"key": "via-haproxy", "value": 1}, timeout=10)
        if answer.status_code == 200:
            print(answer.json()["version"], "acknowledged through haproxy")
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("no write acknowledged through haproxy within 30 s")
    time.sleep(0.5)
PY
log "running the failover tests against the ha profile"
KV_HA_COMPOSE_PROJECT="$PROJECT" KV_HA_NODES="$nodes" KV_COMPOSE_COMMAND=docker-compose \
  KV_DOCKER_COMMAND="$DOCKER" \
  timeout 900 "$PYTHON" -m pytest tests/system/test_failover.py -m "not local" -p no:cacheprovider
log "container job passed"
