#!/usr/bin/env python3
"""Builds a small test image from the host's static busybox and pushes it to a registry
over the distribution API (plain HTTP), as `docker push` would: blobs by monolithic upload,
then the manifest under a tag. Used by mesh's netns tests (netns-tests/src/registry.rs).

usage: testimage.py REGISTRY(host:port) REPOSITORY TAG VERSION [--oci] [--healthcheck JSON]
                    [--entrypoint JSON] [--cmd JSON] [--user NAME]
       testimage.py REGISTRY REPOSITORY TAG VERSION --save FILE

With --save FILE nothing is pushed: the image is written to FILE as `docker save` writes it
(`manifest.json` naming REPOSITORY:TAG, or REGISTRY/REPOSITORY:TAG unless REGISTRY is "-",
`repositories`, the config as `<hex>.json`, each layer uncompressed as `<hex>/layer.tar` with
its `VERSION` and `json`), and the config digest (the image ID) is printed instead.

The image has two gzip layers:
  1. busybox at /bin/busybox with applet symlinks, /etc/passwd and /etc/group (root,
     nobody, app:1000), /etc/release ("base"), /doomed and /keep/a, /keep/b;
  2. a whiteout of /doomed, an opaque /keep holding only /keep/c, /etc/release = VERSION,
     and /srv/index.html = "hello from VERSION".
Its config: Env PATH and IMAGE_VAR=from-image, Cmd ["sh"], WorkingDir /srv, ExposedPorts 80.
Prints the manifest digest on stdout.

With --healthcheck JSON, the config has that `Healthcheck` (Docker's HealthConfig, durations in
nanoseconds), as a Dockerfile's HEALTHCHECK writes it.

With --entrypoint JSON, --cmd JSON (each a JSON array of strings) or --user NAME, the config has
that `Entrypoint`, that `Cmd` instead of ["sh"], or that `User`, as a Dockerfile's ENTRYPOINT,
CMD and USER write them; without them the config is as above.

With --big (for `mesh-bench images`), the image instead has five gzip layers (level 1: random
data does not compress): the base above, three of 10 files of 1 MiB of random data
(/data/<n>/fNN), and one of 2000 files of 4 KiB (/small/dNN/fNNNN), as real images have many
small files; one JSON line is printed: {"digest", "layers", "compressed", "unpacked"}.
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

APPLETS = ["sh", "cat", "echo", "ls", "sleep", "id", "env", "hostname", "httpd", "nc",
           "ps", "touch", "mkdir", "rm", "grep", "wc", "head", "true", "false", "test",
           "stat", "mount", "readlink", "kill", "ip", "ping"]


def add_file(tar, name, data, mode=0o644, uid=0, gid=0):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1700000000
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 1700000000
    tar.addfile(info)


def add_link(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = 1700000000
    tar.addfile(info)


def layer(build, level=9):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    raw = raw.getvalue()
    gz = gzip.compress(raw, compresslevel=level, mtime=0)
    return raw, gz


def random_files(n):
    def build(tar):
        add_dir(tar, "data")
        add_dir(tar, f"data/{n}")
        for i in range(10):
            add_file(tar, f"data/{n}/f{i:02}", os.urandom(1 << 20))
    return build


def small_files(tar):
    add_dir(tar, "small")
    for d in range(20):
        add_dir(tar, f"small/d{d:02}")
        for i in range(100):
            add_file(tar, f"small/d{d:02}/f{i:04}", os.urandom(4096))


def base(tar):
    for d in ["bin", "etc", "keep", "srv", "tmp", "proc", "sys", "dev", "root"]:
        add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
    with open("/bin/busybox", "rb") as f:
        add_file(tar, "bin/busybox", f.read(), 0o755)
    for a in APPLETS:
        add_link(tar, "bin/" + a, "busybox")
    add_file(tar, "etc/passwd",
             b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
             b"app:x:1000:1000:app:/srv:/bin/sh\n")
    add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n")
    add_file(tar, "etc/release", b"base\n")
    add_file(tar, "doomed", b"deleted by the second layer\n")
    add_file(tar, "keep/a", b"a\n")
    add_file(tar, "keep/b", b"b\n")


def top(version):
    def build(tar):
        add_file(tar, ".wh.doomed", b"")
        add_dir(tar, "keep")
        add_file(tar, "keep/.wh..wh..opq", b"")
        add_file(tar, "keep/c", b"c\n")
        add_dir(tar, "etc")
        add_file(tar, "etc/release", (version + "\n").encode())
        add_dir(tar, "srv")
        add_file(tar, "srv/index.html", ("hello from " + version + "\n").encode())
    return build


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


def save(path, name, tag, layers, config_blob):
    """Writes a `docker save` archive of the image to `path`."""
    entries = []
    layer_paths = []
    parent = ""
    for raw, _ in layers:
        hexid = hashlib.sha256((parent + sha(raw)).encode()).hexdigest()
        layer_paths.append(hexid + "/layer.tar")
        entries.append((hexid + "/", None))
        entries.append((hexid + "/VERSION", b"1.0"))
        v1 = {"id": hexid, "created": "2026-12-04T00:00:00Z", "config": {}}
        if parent:
            v1["parent"] = parent
        entries.append((hexid + "/json", json.dumps(v1).encode()))
        entries.append((hexid + "/layer.tar", raw))
        parent = hexid
    config_name = hashlib.sha256(config_blob).hexdigest() + ".json"
    entries.append((config_name, config_blob))
    manifest = [{"Config": config_name, "RepoTags": [name + ":" + tag], "Layers": layer_paths}]
    entries.append(("manifest.json", json.dumps(manifest).encode()))
    entries.append(("repositories", json.dumps({name: {tag: parent}}).encode()))
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, data in entries:
            if data is None:
                add_dir(tar, n.rstrip("/"))
            else:
                add_file(tar, n, data)


def main():
    registry, repo, tag, version = sys.argv[1:5]
    oci = "--oci" in sys.argv[5:]
    save_to = None
    if "--save" in sys.argv[5:]:
        i = sys.argv.index("--save", 5)
        if i + 1 >= len(sys.argv):
            raise SystemExit("--save needs a FILE")
        save_to = sys.argv[i + 1]
    big = "--big" in sys.argv[5:]
    def option(flag, what):
        if flag not in sys.argv[5:]:
            return None
        i = sys.argv.index(flag, 5)
        if i + 1 >= len(sys.argv):
            raise SystemExit(f"{flag} needs {what}")
        return sys.argv[i + 1]

    def json_list(flag):
        v = option(flag, "a JSON array of strings")
        if v is None:
            return None
        v = json.loads(v)
        if not isinstance(v, list) or not all(isinstance(w, str) for w in v):
            raise SystemExit(f"{flag} needs a JSON array of strings")
        return v

    healthcheck = option("--healthcheck", "a JSON HealthConfig")
    healthcheck = None if healthcheck is None else json.loads(healthcheck)
    entrypoint = json_list("--entrypoint")
    cmd = json_list("--cmd")
    user = option("--user", "a user NAME")
    if big:
        layers = [layer(base, 1)] + [layer(random_files(n), 1) for n in (1, 2, 3)]
        layers.append(layer(small_files, 1))
    else:
        layers = [layer(base), layer(top(version))]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-12-04T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "IMAGE_VAR=from-image"],
            "Cmd": ["sh"],
            "WorkingDir": "/srv",
            "ExposedPorts": {"80/tcp": {}},
            "Labels": {"version": version},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha(raw) for raw, _ in layers]},
        "history": [{"created_by": f"testimage.py layer {i + 1}"} for i in range(len(layers))],
    }
    if healthcheck is not None:
        config["config"]["Healthcheck"] = healthcheck
    if entrypoint is not None:
        config["config"]["Entrypoint"] = entrypoint
    if cmd is not None:
        config["config"]["Cmd"] = cmd
    if user is not None:
        config["config"]["User"] = user
    config_blob = json.dumps(config, sort_keys=True).encode()
    if save_to is not None:
        save(save_to, repo if registry == "-" else registry + "/" + repo, tag, layers,
             config_blob)
        print(sha(config_blob))
        return
    if oci:
        media = "application/vnd.oci.image.manifest.v1+json"
        config_media = "application/vnd.oci.image.config.v1+json"
        layer_media = "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        media = "application/vnd.docker.distribution.manifest.v2+json"
        config_media = "application/vnd.docker.container.image.v1+json"
        layer_media = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = {
        "schemaVersion": 2,
        "mediaType": media,
        "config": {"mediaType": config_media, "size": len(config_blob),
                   "digest": push_blob(registry, repo, config_blob)},
        "layers": [{"mediaType": layer_media, "size": len(gz),
                    "digest": push_blob(registry, repo, gz)} for _, gz in layers],
    }
    body = json.dumps(manifest).encode()
    request("PUT", f"http://{registry}/v2/{repo}/manifests/{tag}", body, {"Content-Type": media})
    if big:
        print(json.dumps({
            "digest": sha(body),
            "layers": len(layers),
            "compressed": sum(len(gz) for _, gz in layers),
            "unpacked": sum(len(raw) for raw, _ in layers),
        }))
    else:
        print(sha(body))


if __name__ == "__main__":
    main()
