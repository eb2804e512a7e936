"""Simulated hosts in a real etcd beside one real weft, for the mesh benchmark.

Writes N hosts (host record, membership, one block each) the way weft itself would,
through etcd's JSON gateway (no client library), and measures what one real weft does
with them: how long a newly registered host takes to be its WireGuard peer with its
block routed, what a join costs weft (CPU) and etcd (bytes sent, range requests), the
mesh pass's time (from weft's own log), weft's and wireguard-go's memory, and reading
the WireGuard device with N peers. Prints one JSON record per line, for scripts/bench.sh.

Nothing is sent to a simulated host: their endpoints are loopback addresses of the real
weft's own namespace and they get no keepalive, so no packet ever leaves for them.

    python3 mesh_sim.py ETCD PREFIX POOL BLOCK_PREFIX HOLDER_PID WEFT_PID WEFT_LOG SIZES JOINS
"""
import base64
import ipaddress
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

ETCD, PREFIX, POOL, BLOCK_PREFIX, HOLDER, WEFT_PID, WEFT_LOG, SIZES, JOINS = sys.argv[1:10]
POOL = ipaddress.ip_network(POOL)
BLOCK_PREFIX = int(BLOCK_PREFIX)
SIZES = [int(n) for n in SIZES.split(",")]
JOINS = int(JOINS)


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def call(path, body):
    req = urllib.request.Request(ETCD + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def seg(net):
    return f"{net.network_address}_{net.prefixlen}"


LEASE = call("/v3/lease/grant", {"TTL": 3600})["ID"]


def put_ops(pairs):
    return [{"requestPut": {"key": b64(PREFIX + k), "value": b64(json.dumps(v)), "lease": LEASE}} for k, v in pairs]


def txn(ops):
    for i in range(0, len(ops), 120):  # etcd allows 128 operations per transaction
        call("/v3/kv/txn", {"success": ops[i:i + 120]})


def taken_blocks():
    key = PREFIX + f"blocks/{seg(POOL)}/"
    end = key[:-1] + chr(ord(key[-1]) + 1)
    kvs = call("/v3/kv/range", {"key": b64(key), "range_end": b64(end), "keys_only": True}).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in kvs}


free = (b for b in POOL.subnets(new_prefix=BLOCK_PREFIX) if seg(b) not in taken_blocks())


def sim_host(i):
    """The records of simulated host i: what weft writes when it registers with one block."""
    hid = f"sim{i:05d}"
    block = next(free)
    key = base64.b64encode(i.to_bytes(4, "big") * 8).decode()
    endpoint = f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}:51820"
    return hid, block, [
        (f"seen/{hid}", {"last_seen": int(time.time())}),
        (f"hosts/{hid}", {"id": hid, "public_key": key, "endpoint": endpoint, "keepalive": None}),
        (f"blocks/{seg(POOL)}/{seg(block)}", {"host": hid}),
    ]


def in_h1(*cmd):
    return subprocess.run(["nsenter", "-t", HOLDER, "-m", "-n", *cmd], capture_output=True, text=True).stdout


def allowed_blocks():
    """The blocks allowed on the device, by peer key."""
    return set(in_h1("wg", "show", "weft0", "allowed-ips").split())


def routed(block):
    return bool(in_h1("ip", "-4", "route", "show", "exact", str(block), "dev", "weft0").strip())


def wait_until(pred, limit=60.0):
    end = time.time() + limit
    while time.time() < end:
        if pred():
            return time.time()
        time.sleep(0.005)
    return float("nan")


def metrics():
    text = urllib.request.urlopen(ETCD + "/metrics", timeout=10).read().decode()
    def total(name):
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name) and not l.startswith("#"))
    return total("etcd_network_client_grpc_sent_bytes_total"), total("etcd_debugging_mvcc_range_total")


def cpu_s(pid):
    """CPU time of every thread of pid, in seconds (schedstat: nanoseconds, not ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{task}/schedstat").read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total / 1e9


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


def wireguard_pid():
    """The wireguard-go in the real weft's namespace (it daemonises: not weft's child)."""
    netns = os.readlink(f"/proc/{HOLDER}/ns/net")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "wireguard-go" and os.readlink(f"/proc/{pid}/ns/net") == netns:
                return pid
        except OSError:
            pass
    return None


def log_offset():
    return os.path.getsize(WEFT_LOG)


def pass_times(since):
    """Mesh pass durations (ms) weft logged after byte offset `since`: (from the view, full)."""
    with open(WEFT_LOG) as f:
        f.seek(since)
        found = re.findall(r"mesh pass.*?took_ms=([0-9.]+) full=(true|false)", f.read())
    return [float(ms) for ms, full in found if full == "false"], [float(ms) for ms, full in found if full == "true"]


def record(name, unit, values, **extra):
    values = [v for v in values if v == v]
    if not values:
        return
    print(json.dumps({"name": name, "unit": unit, "median": round(statistics.median(values), 4),
                      "min": round(min(values), 4), "max": round(max(values), 4), **extra}), flush=True)


population = 1  # the real weft's own host
for n in SIZES:
    # Grow to n hosts in all (the real one included), then let weft settle.
    grow = [sim_host(i) for i in range(population, n)]
    txn([op for _, _, recs in grow for op in put_ops(recs)])
    population = n
    last = grow[-1][1] if grow else None
    if last is not None:
        wait_until(lambda: str(last) in allowed_blocks() and routed(last), 120)
    time.sleep(3)
    wg_pid = wireguard_pid()
    since = log_offset()
    # Idle: the periodic passes alone.
    t0, s0, (b0, r0) = cpu_s(WEFT_PID), time.time(), metrics()
    time.sleep(10)
    t1, s1, (b1, r1) = cpu_s(WEFT_PID), time.time(), metrics()
    idle_cpu = 100 * (t1 - t0) / (s1 - s0)
    idle_bytes = (b1 - b0) / (s1 - s0)
    lags, leave_lags, cpu_ms, sent, ranges = [], [], [], [], []
    for j in range(JOINS):
        hid, block, recs = sim_host(population + j)
        t0, (b0, r0) = cpu_s(WEFT_PID), metrics()
        start = time.time()
        txn(put_ops(recs))
        seen = wait_until(lambda: str(block) in allowed_blocks() and routed(block))
        lags.append(seen - start)
        time.sleep(0.2)  # the passes that follow the join, included in its cost
        t1, (b1, r1) = cpu_s(WEFT_PID), metrics()
        cpu_ms.append(1000 * (t1 - t0))
        sent.append((b1 - b0) / 1024)
        ranges.append(r1 - r0)
        # And it leaves again: its records deleted (as its lease would be).
        start = time.time()
        txn([{"requestDeleteRange": {"key": b64(PREFIX + k)}} for k, _ in recs])
        gone = wait_until(lambda: str(block) not in allowed_blocks() and not routed(block))
        leave_lags.append(gone - start)
        time.sleep(0.3)
    passes = pass_times(since)
    reads = []
    for _ in range(5):
        s = time.time()
        in_h1("wg", "show", "weft0", "dump")
        reads.append(1000 * (time.time() - s))
    label = f"{n} hosts (simulated)"
    record(f"mesh: join convergence, {label} (registration to peer and route programmed)", "s", lags, hosts=n)
    record(f"mesh: leave convergence, {label} (records deleted to its block unrouted; the peer stays for the liveness window)", "s", leave_lags, hosts=n)
    record(f"mesh: mesh pass time after watch events, {label}", "ms", passes[0], hosts=n)
    record(f"mesh: mesh pass time, full (timer), {label}", "ms", passes[1], hosts=n)
    record(f"mesh: weft CPU per join, {label} (join and the passes after it)", "ms", cpu_ms, hosts=n)
    record(f"mesh: etcd bytes sent per join, {label} (to all clients, the join's writes included)", "KiB", sent, hosts=n)
    record(f"mesh: etcd range requests per join, {label}", "requests", ranges, hosts=n)
    record(f"mesh: weft CPU idle, {label}", "% of one core", [idle_cpu], hosts=n)
    record(f"mesh: etcd bytes sent idle, {label}", "KiB/s", [idle_bytes / 1024], hosts=n)
    record(f"mesh: weft RSS, {label}", "MiB", [rss_mib(WEFT_PID)], hosts=n)
    if wg_pid:
        record(f"mesh: wireguard-go RSS, {label}", "MiB", [rss_mib(wg_pid)], hosts=n)
    record(f"mesh: reading the WireGuard device (wg show dump), {label}", "ms", reads, hosts=n)
