"""OCI images through the official `hypeman` Python client.

Run inside the test's network namespace with HYPEMAN_BASE_URL,
HYPEMAN_API_KEY and HYPEMAN_IMAGE (a reference in the test's registry) set.
Exits non-zero on the first mismatch; prints "hypeman image client: ok".

Flow: images.create (pending or already known), poll images.get until
ready, images.list shows it; create "img-src" from it, fork it while
Running into "img-fork"; images.delete while in use is a 409; delete the
instances, then the image (404 afterwards).
"""
import os
import sys
import time

import hypeman

client = hypeman.Hypeman(
    base_url=os.environ["HYPEMAN_BASE_URL"],
    api_key=os.environ["HYPEMAN_API_KEY"],
    max_retries=0,
    timeout=300,
)
IMAGE = os.environ["HYPEMAN_IMAGE"]

img = client.images.create(name=IMAGE)
assert img.name == IMAGE, img
assert img.status in ("pending", "pulling", "converting", "ready"), img
deadline = time.monotonic() + 240
while img.status not in ("ready", "failed"):
    if time.monotonic() > deadline:
        sys.exit(f"image not ready in time: {img}")
    time.sleep(0.5)
    img = client.images.get(IMAGE)
assert img.status == "ready", img
assert img.digest.startswith("sha256:"), img
assert img.entrypoint == ["python3", "-m", "http.server"], img
assert img.env and img.env.get("GREETING") == "hello", img
assert img.size_bytes and img.size_bytes > 0, img
assert any(i.name == IMAGE for i in client.images.list()), "image not listed"

src = client.instances.create(name="img-src", image=IMAGE)
assert src.state == "Running", src
fork = client.instances.fork(src.id, name="img-fork", from_running=True)
assert fork.state == "Running", fork
assert fork.network and src.network and fork.network.ip != src.network.ip, (fork, src)

try:
    client.images.delete(IMAGE)
    sys.exit("deleting an image in use succeeded")
except hypeman.ConflictError as e:
    assert e.status_code == 409, e

for inst in (fork, src):
    client.instances.delete(inst.id)
client.images.delete(IMAGE)
try:
    client.images.get(IMAGE)
    sys.exit("the deleted image is still there")
except hypeman.NotFoundError:
    pass
print("hypeman image client: ok")
