#!/usr/bin/env bash
# The main job, end to end: set up, boot a VM, run a web server in it, fork it
# while it runs into three copies, and show every fork answering on its own new
# address, with timings. Then the same with your own image: pull an OCI image
# (Debian + python3, built by scripts/oci-fixture.sh) from a registry, boot
# it with its disk, fork it, and show each fork's disk is its own. Everything network-related happens inside a network
# namespace this script creates (forkvm-demo) and removes on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release} ./scripts/setup.sh
BIN=target/${PROFILE:-release}/forkvm
NS=forkvm-demo
RUN=$(mktemp -d /tmp/forkvm-demo.XXXXXX)
export FORKVM_SOCKET=$RUN/forkvm.sock
export FORKVM_DATA_DIR=${FORKVM_DATA_DIR:-/var/lib/forkvm}
export FORKVM_MEM_DIR=/dev/shm/forkvm-demo

cleanup() {
  set +e
  for n in $("$BIN" ps --json 2>/dev/null | python3 -c 'import sys,json; [print(i["id"]) for i in json.load(sys.stdin)]' 2>/dev/null); do
    "$BIN" rm "$n" >/dev/null 2>&1
  done
  "$BIN" image rm "${IMAGE:-none}" >/dev/null 2>&1
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  [ -n "${REGISTRY:-}" ] && kill "$REGISTRY" 2>/dev/null && wait "$REGISTRY" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  rm -rf "$RUN" "$FORKVM_MEM_DIR"
}
trap cleanup EXIT

ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up  # the registry of part two listens on loopback
echo "==> starting the daemon in network namespace $NS (log: $RUN/daemon.log)"
ip netns exec "$NS" "$BIN" serve >"$RUN/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do "$BIN" ps >/dev/null 2>&1 && break; sleep 0.1; done

echo "==> forkvm run demo"
start=$(date +%s%N)
"$BIN" run demo
echo "    boot to Running: $(( ($(date +%s%N) - start) / 1000000 )) ms"
"$BIN" ps
IP=$("$BIN" inspect demo --json | python3 -c 'import sys,json; print(json.load(sys.stdin)["network"]["ip"])')
echo "==> ping $IP from the host side of the bridge"
ip netns exec "$NS" ping -c 3 -i 0.2 "$IP"
echo "==> forkvm exec demo -- ip -4 addr show eth0"
start=$(date +%s%N)
"$BIN" exec demo -- ip -4 addr show eth0
echo "    exec round trip: $(( ($(date +%s%N) - start) / 1000000 )) ms"
echo "==> start a web server in the source"
"$BIN" exec demo -- sh -c 'mkdir -p /var/www && echo "hello from $(hostname)" > /var/www/index.html && httpd -p 80 -h /var/www'
echo "==> forkvm fork demo --name copy --count 3 --from-running"
start=$(date +%s%N)
"$BIN" fork demo --name copy --count 3 --from-running
echo "    3 forks in: $(( ($(date +%s%N) - start) / 1000000 )) ms"
"$BIN" ps
echo "==> every fork answers HTTP on its own address (served by the process it inherited)"
for n in copy-1 copy-2 copy-3; do
  FIP=$("$BIN" inspect "$n" --json | python3 -c 'import sys,json; print(json.load(sys.stdin)["network"]["ip"])')
  printf '    %-7s %-12s ' "$n" "$FIP"
  ip netns exec "$NS" curl -s --max-time 5 "http://$FIP/"
done
echo "==> the fork's own view of its network (forkvm exec copy-1 -- ip -4 addr show eth0)"
"$BIN" exec copy-1 -- ip -4 addr show eth0

echo
echo "==> your own image: a registry on the namespace's loopback, the test image pushed into it"
LAYOUT=$(FORKVM_DATA_DIR=$FORKVM_DATA_DIR ./scripts/oci-fixture.sh)
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:5000\n' \
  "$RUN/registry" > "$RUN/registry.yml"
ip netns exec "$NS" docker-registry serve "$RUN/registry.yml" >"$RUN/registry.log" 2>&1 &
REGISTRY=$!
for _ in $(seq 100); do ip netns exec "$NS" curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.1; done
IMAGE=127.0.0.1:5000/demo/py:1
ip netns exec "$NS" skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$LAYOUT:1" "docker://$IMAGE"
echo "==> forkvm image pull $IMAGE"
"$BIN" image pull "$IMAGE"
"$BIN" image ls
echo "==> forkvm run web --image $IMAGE (its entrypoint: python3 -m http.server 8080, as user web)"
start=$(date +%s%N)
"$BIN" run web --image "$IMAGE"
echo "    boot to Running: $(( ($(date +%s%N) - start) / 1000000 )) ms"
WIP=$("$BIN" inspect web --json | python3 -c 'import sys,json; print(json.load(sys.stdin)["network"]["ip"])')
for _ in $(seq 300); do ip netns exec "$NS" curl -sf "http://$WIP:8080/" >/dev/null && break; sleep 0.1; done
"$BIN" exec web -- sh -c 'echo "written by the source before the fork" > /srv/www/note.txt'
echo "==> forkvm fork web --name webfork --count 3 --from-running (memory and disk, same instant)"
start=$(date +%s%N)
"$BIN" fork web --name webfork --count 3 --from-running
echo "    3 forks in: $(( ($(date +%s%N) - start) / 1000000 )) ms"
"$BIN" exec webfork-1 -- sh -c 'echo "only in webfork-1" > /srv/www/mine.txt'
for n in web webfork-1 webfork-2 webfork-3; do
  FIP=$("$BIN" inspect "$n" --json | python3 -c 'import sys,json; print(json.load(sys.stdin)["network"]["ip"])')
  note=$(ip netns exec "$NS" curl -sf --max-time 5 "http://$FIP:8080/note.txt" || echo "(none)")
  mine=$(ip netns exec "$NS" curl -sf --max-time 5 "http://$FIP:8080/mine.txt" || echo "(absent)")
  printf '    %-10s %-12s note.txt: %-40s mine.txt: %s\n' "$n" "$FIP" "$note" "$mine"
done
