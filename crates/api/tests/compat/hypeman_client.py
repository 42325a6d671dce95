"""Drive a running forkvm daemon with hypeman's official Python client.

Usage: HYPEMAN_BASE_URL=http://127.0.0.1:PORT HYPEMAN_API_KEY=TOKEN python hypeman_client.py
Needs `pip install hypeman==0.28.0`. Exits non-zero on the first mismatch.
Written against the stub Manager (no VMs): checks paths, auth, status codes,
error bodies, retry behaviour and that the Instance JSON parses.
"""
import json, os, time
import hypeman
from hypeman.types import Instance

c = hypeman.Hypeman()  # base_url / api key from env
checks = 0

def expect(exc_type, fn, code=None):
    global checks
    t0 = time.monotonic()
    try:
        fn()
    except exc_type as e:
        dt = time.monotonic() - t0
        assert dt < 0.4, f"{exc_type.__name__} took {dt:.2f}s: the client retried"
        if code is not None:
            assert isinstance(e.body, dict) and e.body.get("code") == code, e.body
            assert e.body.get("message"), e.body
        checks += 1
        return e
    raise AssertionError(f"expected {exc_type.__name__}")

assert c.health.check().status == "ok"; checks += 1
assert c.instances.list() == []; checks += 1
expect(hypeman.NotFoundError, lambda: c.instances.get("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.delete("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.stop("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.start("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.standby("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.restore("ghost"), "not_found")
expect(hypeman.NotFoundError, lambda: c.instances.fork("ghost", name="f-1", from_running=True), "not_found")
expect(hypeman.NotFoundError, lambda: list(c.instances.logs("ghost", tail=5)), "not_found")
expect(hypeman.BadRequestError, lambda: c.instances.create(name="Bad_Name", image="x"), "invalid_request")
expect(hypeman.BadRequestError, lambda: c.instances.create(name="ok", image="x", size="lots"), "invalid_request")
expect(hypeman.BadRequestError, lambda: c.instances.fork("ghost", name="NO"), "invalid_request")
# valid request with many hypeman-only fields: passes validation, stub says 501
expect(hypeman.InternalServerError, lambda: c.instances.create(
    name="web-1", image="docker.io/library/alpine", size="512MB", vcpus=1, env={"A": "1"},
    cmd=["sleep", "1"], network={"enabled": True, "bandwidth_upload": "1Gbps"},
    tags={"t": "v"}, ttl="1h", hypervisor="qemu"), "not_implemented")
expect(hypeman.InternalServerError, lambda: c.snapshots.list(), "not_implemented")
bad = hypeman.Hypeman(api_key="wrong")
expect(hypeman.AuthenticationError, lambda: bad.instances.list(), "unauthorized")

# The Instance JSON forkvm emits (same text as wire::shape_tests) parses.
sample = json.loads('''{"id":"i-1","name":"web-1","image":"default","state":"Running","state_error":null,
  "created_at":"2026-01-01T00:00:00Z","started_at":null,"stopped_at":null,"env":{"A":"1"},"vcpus":2,
  "size":"1GB","hypervisor":"qemu","has_snapshot":false,"network":{"enabled":true,"ip":"10.88.0.2",
  "mac":"02:fc:00:00:00:02","name":"default","tap":"fvtap0","gateway":"10.88.0.1","prefix_len":16,
  "bridge":"forkvm0"},"memory_mb":1024,"command":["sleep","9"],"pid":42,"accel":"tcg"}''')
inst = Instance.model_validate(sample)
assert inst.state == "Running" and inst.network.ip == "10.88.0.2" and inst.size == "1GB"
assert inst.hypervisor == "qemu" and inst.created_at.year == 2026
checks += 1
print(f"hypeman client compatibility: {checks} checks passed")
