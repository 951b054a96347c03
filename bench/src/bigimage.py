#!/usr/bin/env python3
"""Builds the multi-layer image of `mesh-bench images` and pushes it to a registry over the
distribution API (plain HTTP), as `docker push` would: blobs by monolithic upload, then a
Docker schema 2 manifest under a tag.

usage: bigimage.py REGISTRY(host:port) REPOSITORY TAG

Layers (gzip, level 1; random data does not compress, so compressed ~ unpacked size):
  1. the host's static busybox at /bin/busybox with a few applet links, /etc/passwd;
  2-4. 10 files of 1 MiB of random data each (/data/<layer>/fNN);
  5. 2000 files of 4 KiB of random data (/small/dNN/fNNNN), many small files as real
     images have.
Prints one JSON line: {"digest", "layers", "compressed", "unpacked"} (sizes in bytes).
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request

MTIME = 1700000000


def add_file(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = MTIME
    tar.addfile(info)


def add_link(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = MTIME
    tar.addfile(info)


def layer(build):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    raw = raw.getvalue()
    return raw, gzip.compress(raw, compresslevel=1, mtime=0)


def base(tar):
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "data", "small"]:
        add_dir(tar, d)
    with open("/bin/busybox", "rb") as f:
        add_file(tar, "bin/busybox", f.read(), 0o755)
    for a in ["sh", "sleep", "ls", "cat", "du"]:
        add_link(tar, "bin/" + a, "busybox")
    add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")


def big(n):
    def build(tar):
        add_dir(tar, "data")
        add_dir(tar, f"data/{n}")
        for i in range(10):
            add_file(tar, f"data/{n}/f{i:02}", os.urandom(1 << 20))
    return build


def small(tar):
    add_dir(tar, "small")
    for d in range(20):
        add_dir(tar, f"small/d{d:02}")
        for i in range(100):
            add_file(tar, f"small/d{d:02}/f{i:04}", os.urandom(4096))


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    for attempt in range(50):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{method} {url}: {e.code} {e.read()[:300]!r}")
        except OSError:
            if attempt == 49:
                raise
            time.sleep(0.1)


def push_blob(registry, repo, data):
    digest = sha(data)
    _, headers, _ = request("POST", f"http://{registry}/v2/{repo}/blobs/uploads/")
    loc = headers["Location"]
    if loc.startswith("/"):
        loc = f"http://{registry}{loc}"
    sep = "&" if "?" in loc else "?"
    request("PUT", f"{loc}{sep}digest={digest}", data,
            {"Content-Type": "application/octet-stream"})
    return digest


def main():
    registry, repo, tag = sys.argv[1:4]
    layers = [layer(base), layer(big(1)), layer(big(2)), layer(big(3)), layer(small)]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-12-04T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [sha(raw) for raw, _ in layers]},
        "history": [{"created_by": f"bigimage.py layer {i + 1}"} for i in range(len(layers))],
    }
    config_blob = json.dumps(config, sort_keys=True).encode()
    layer_media = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config_blob), "digest": push_blob(registry, repo, config_blob)},
        "layers": [{"mediaType": layer_media, "size": len(gz),
                    "digest": push_blob(registry, repo, gz)} for _, gz in layers],
    }
    body = json.dumps(manifest).encode()
    request("PUT", f"http://{registry}/v2/{repo}/manifests/{tag}", body,
            {"Content-Type": manifest["mediaType"]})
    print(json.dumps({
        "digest": sha(body),
        "layers": len(layers),
        "compressed": sum(len(gz) for _, gz in layers),
        "unpacked": sum(len(raw) for raw, _ in layers),
    }))


if __name__ == "__main__":
    main()
