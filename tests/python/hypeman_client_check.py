"""Drive a forkvm daemon with the official `hypeman` Python client.

Run inside the test's network namespace with HYPEMAN_BASE_URL and
HYPEMAN_API_KEY set. Exits non-zero (with a message) on the first mismatch.
"""
import os
import sys
import threading
import time

import hypeman

client = hypeman.Hypeman(
    base_url=os.environ["HYPEMAN_BASE_URL"], api_key=os.environ["HYPEMAN_API_KEY"]
)

# A wrong token is refused.
bad = hypeman.Hypeman(base_url=os.environ["HYPEMAN_BASE_URL"], api_key="wrong")
try:
    bad.instances.list()
    sys.exit("a request with a wrong token was accepted")
except hypeman.AuthenticationError:
    pass

inst = client.instances.create(image="default", name="py-client", vcpus=1, size="256MB",
                               tags={"team": "forkvm", "env": "test"})
assert inst.state == "Running", inst
assert inst.name == "py-client"
assert inst.network is not None and inst.network.ip, inst.network
print(f"created {inst.id} ip={inst.network.ip} mac={inst.network.mac}")

assert inst.tags == {"team": "forkvm", "env": "test"}, inst.tags
tagged = client.instances.list(tags={"team": "forkvm"})
assert [i.id for i in tagged] == [inst.id], tagged
assert client.instances.list(tags={"team": "other"}) == []

listed = client.instances.list()
assert any(i.id == inst.id for i in listed), listed

got = client.instances.get(inst.id)
assert got.id == inst.id and got.network.ip == inst.network.ip, got

# stats: the VMM's CPU and memory, the TAP's counters (the pings and the
# agent's traffic so far make them non-zero).
stats = client.instances.stats(inst.id)
assert stats.instance_id == inst.id and stats.allocated_vcpus == 1, stats
assert stats.cpu_seconds > 0 and stats.memory_rss_bytes > 0, stats
assert stats.allocated_memory_bytes == 256 << 20, stats
assert stats.network_tx_bytes > 0, stats
# forkvm's extra: the guest's own memory view (MemTotal a little under 256 MiB).
extra = stats.model_extra or {}
assert 128 << 20 < extra.get("guest_memory_total_bytes", 0) <= 256 << 20, extra

# stat of guest paths (hypeman's PathInfo).
info = client.instances.stat(inst.id, path="/bin")
assert info.exists and info.is_dir, info
info = client.instances.stat(inst.id, path="/does/not/exist")
assert not info.exists, info

stopped = client.instances.stop(inst.id)
assert stopped.state == "Stopped", stopped.state

started = client.instances.start(inst.id)
assert started.state == "Running", started.state
assert started.network.ip == inst.network.ip

# instances.wait: at once when there; timed out when the state does not come.
waited = client.instances.wait(inst.id, state="Running", api_timeout="10s")
assert waited.state == "Running" and not waited.timed_out, waited
waited = client.instances.wait(inst.id, state="Standby", api_timeout="300ms")
assert waited.state == "Running" and waited.timed_out, waited

# The client reads logs as a server-sent event stream of lines.
logs = " ".join(str(line) for line in client.instances.logs(inst.id))
assert "forkvm-agent" in logs, logs[-500:]

# logs(follow=True) streams what is written next and ends when the
# instance stops. The line is written through forkvm's JSON exec (the
# client's own exec is a WebSocket).
followed = []
follower = threading.Thread(
    target=lambda: followed.extend(
        str(line) for line in client.instances.logs(inst.id, follow=True)
    ),
    daemon=True,
)
follower.start()
client.post(
    f"/instances/{inst.id}/exec",
    body={"command": ["sh", "-c", "echo follow-marker-4711 > /dev/console"]},
    cast_to=object,
)
deadline = time.monotonic() + 30
while not any("follow-marker-4711" in l for l in followed):
    assert time.monotonic() < deadline, followed[-20:]
    time.sleep(0.1)
client.instances.stop(inst.id)
follower.join(30)
assert not follower.is_alive(), "the followed log did not end when the instance stopped"

vmm_log = list(client.instances.logs(inst.id, source="vmm"))
assert isinstance(vmm_log, list)

try:
    client.instances.get("does-not-exist")
    sys.exit("unknown id did not raise")
except hypeman.NotFoundError:
    pass

try:
    client.instances.create(image="default", name="Bad_Name")
    sys.exit("invalid name accepted")
except hypeman.BadRequestError:
    pass

# A field forkvm does not implement is refused by name, not dropped.
try:
    client.instances.create(image="default", name="py-ttl", ttl="1h")
    sys.exit("an unsupported field (ttl) was accepted")
except hypeman.BadRequestError as e:
    assert "ttl" in str(e), e
assert all(i.name != "py-ttl" for i in client.instances.list())

client.instances.delete(inst.id)
assert all(i.id != inst.id for i in client.instances.list())
print("hypeman client: ok")
