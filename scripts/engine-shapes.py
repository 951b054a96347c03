#!/usr/bin/env python3
"""Compares the JSON shapes of two Docker Engine API servers (a real dockerd and meshd).

Values differ between the two, shapes must not: this prints the keys the reference (dockerd)
has and the other lacks, the keys only the other has, and type mismatches (string, number,
bool, object, array, null), recursively. Arrays are compared by the union of their elements'
shapes (so one element lacking an optional key does not hide it, and the order of elements
does not matter); maps keyed by data (labels, options, IDs) are compared by their values'
union shape too, under the key `*`.

usage:
  engine-shapes.py diff REF.json OTHER.json
      shape differences of two saved documents
  engine-shapes.py get SOCKET PATH
      GET PATH on a unix socket and print the JSON (or the headers for /logs and /_ping)
  engine-shapes.py capture SOCKET DIR
      save the compared endpoints (see ENDPOINTS) as DIR/<name>.json; IDs are taken from the
      service `web`, its tasks and the network `appnet`
  engine-shapes.py compare REF_DIR OTHER_DIR
      `diff` for every file both directories hold
"""
import http.client
import json
import os
import socket
import sys
import urllib.parse

API = "/v1.41"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def request(sock, method, path, body_limit=None):
    c = UnixHTTPConnection(sock)
    c.request(method, path, headers={"Host": "docker"})
    r = c.getresponse()
    headers = {k: v for k, v in r.getheaders()}
    body = r.read(body_limit) if body_limit is not None else r.read()
    c.close()
    return r.status, headers, body


def get_json(sock, path):
    status, _, body = request(sock, "GET", path)
    if status != 200:
        raise SystemExit(f"GET {path}: {status} {body[:200]!r}")
    return json.loads(body)


def get_headers(sock, path, method="GET"):
    status, headers, _ = request(sock, method, path, body_limit=0 if method == "GET" else None)
    # Values that only name times or lengths are not shapes.
    drop = {"date", "content-length", "transfer-encoding"}
    # Header names are case-insensitive (dockerd sends `Api-Version`, hyper `api-version`).
    return {"Status": status, **{k.lower(): v for k, v in headers.items() if k.lower() not in drop}}


def q(filters):
    return urllib.parse.quote(json.dumps(filters))


def capture(sock, out):
    os.makedirs(out, exist_ok=True)
    svc = get_json(sock, f"{API}/services/web")
    sid = svc["ID"]
    info = get_json(sock, f"{API}/info")
    nid = info["Swarm"]["NodeID"]
    tasks = get_json(sock, f"{API}/tasks?filters={q({'service': {sid: True}})}")
    running = [t for t in tasks if t.get("Status", {}).get("State") == "running"]
    tid = (running or tasks)[0]["ID"]
    net = get_json(sock, f"{API}/networks/appnet")
    netid = net.get("Id") or net.get("ID")
    endpoints = {
        "version": f"{API}/version",
        "info": f"{API}/info",
        "swarm": f"{API}/swarm",
        "nodes": f"{API}/nodes",
        "node": f"{API}/nodes/{nid}",
        "services": f"{API}/services",
        "services-status": f"{API}/services?status=true",
        "service": f"{API}/services/{sid}",
        "service-defaults": f"{API}/services/{sid}?insertDefaults=true",
        "tasks": f"{API}/tasks",
        "task": f"{API}/tasks/{tid}",
        "networks": f"{API}/networks",
        "networks-swarm": f"{API}/networks?filters={q({'scope': {'swarm': True}})}",
        "network": f"{API}/networks/{netid}",
        "network-scope": f"{API}/networks/{netid}?scope=swarm",
    }
    for name, path in endpoints.items():
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(get_json(sock, path), f, indent=2, sort_keys=True)
    heads = {
        "ping-headers": ("HEAD", "/_ping"),
        "logs-headers": ("GET", f"{API}/services/{sid}/logs?stdout=1&stderr=1&tail=1"),
    }
    for name, (method, path) in heads.items():
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(get_headers(sock, path, method), f, indent=2, sort_keys=True)
    print(f"saved {len(endpoints) + len(heads)} documents in {out}")


def kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


# Objects whose keys are data (labels, options, container IDs, driver names), not fields.
DATA_MAPS = {"Labels", "Options", "Containers", "DriverOpts", "Global", "Plugins",
             "ServiceLabels", "Runtimes", "RegistryConfig.IndexConfigs",
             "Healthcheck", "Sysctls", "CapabilityAdd"}


def is_data_map(path):
    last = path.rsplit(".", 1)[-1]
    return last in DATA_MAPS or path.endswith("IndexConfigs") or path.endswith("Mirrors")


def diff(ref, other, path="", out=None):
    out = [] if out is None else out
    kr, ko = kind(ref), kind(other)
    if kr != ko:
        out.append(f"type     {path or '.'}: dockerd {kr}, mesh {ko}")
        return out
    if kr == "array":
        if not ref or not other:
            if ref and not other:
                out.append(f"empty    {path}[]: dockerd has elements, mesh none (not compared)")
            return out
        diff(union(ref), union(other), path + "[]", out)
    elif kr == "object":
        if is_data_map(path):
            if ref and other:
                diff(union(list(ref.values())), union(list(other.values())), path + ".*", out)
            return out
        for k in sorted(set(ref) | set(other)):
            p = f"{path}.{k}" if path else k
            if k not in other:
                out.append(f"missing  {p}: {kind(ref[k])} {short(ref[k])}")
            elif k not in ref:
                out.append(f"extra    {p}: {kind(other[k])} {short(other[k])}")
            else:
                diff(ref[k], other[k], p, out)
    return out


def union(values):
    """Merges a list of values into one carrying every key any object among them has."""
    objs = [v for v in values if isinstance(v, dict)]
    if not objs:
        # Arrays of arrays: merge their elements; scalars: the first non-null one.
        arrs = [v for v in values if isinstance(v, list)]
        if arrs:
            return [union([e for a in arrs for e in a])] if any(arrs) else []
        non_null = [v for v in values if v is not None]
        return non_null[0] if non_null else None
    merged = {}
    for o in objs:
        for k, v in o.items():
            merged.setdefault(k, []).append(v)
    return {k: union(vs) if len(vs) > 1 else vs[0] for k, vs in merged.items()}


def short(v):
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."


def load(path):
    with open(path) as f:
        return json.load(f)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd == "diff" and len(argv) == 4:
        lines = diff(load(argv[2]), load(argv[3]))
        print("\n".join(lines) if lines else "same shape")
        return 1 if lines else 0
    if cmd == "get" and len(argv) == 4:
        path = argv[3]
        if path.endswith("_ping") or "/logs" in path:
            print(json.dumps(get_headers(argv[2], path), indent=2, sort_keys=True))
        else:
            print(json.dumps(get_json(argv[2], path), indent=2, sort_keys=True))
        return 0
    if cmd == "capture" and len(argv) == 4:
        capture(argv[2], argv[3])
        return 0
    if cmd == "compare" and len(argv) == 4:
        names = sorted(set(os.listdir(argv[2])) & set(os.listdir(argv[3])))
        rc = 0
        for n in names:
            if not n.endswith(".json"):
                continue
            lines = diff(load(os.path.join(argv[2], n)), load(os.path.join(argv[3], n)))
            print(f"== {n[:-5]}: {'same shape' if not lines else str(len(lines)) + ' differences'}")
            for line in lines:
                print("   " + line)
            rc |= bool(lines)
        return rc
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
