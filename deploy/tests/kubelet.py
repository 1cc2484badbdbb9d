#!/usr/bin/env python3
"""Plays kubelet for the rendered manifests, without a cluster.

For every container of every Deployment of an overlay, it works out what a
node would run and runs it:

- the argv: the image's ENTRYPOINT and CMD (the Dockerfile's, for the
  token-broker image; the official image's, for redis) combined with the
  container's `command` and `args` by Kubernetes' rules, `$(VAR)` expanded;
- the environment: `value`s, and `valueFrom` the rendered Secrets and
  ConfigMaps (a Secret the overlay expects to exist gets a placeholder; the
  Secret of a cert-manager Certificate gets what cert-manager would put there:
  a CA, and a key and certificate for the Certificate's DNS names);
- the mounted ConfigMaps, Secrets, projected and emptyDir volumes, as files
  under a temporary root: absolute mount paths are rewritten under it;
- the pod network on loopback: each container port gets a free port (the
  process's `0.0.0.0:<port>` becomes `127.0.0.1:<free>`), and each Service
  port a small TCP forwarder, round robin over the pods it selects; Service
  names in argv, environment and mounted files point at their forwarders.

Each process must stay up, listen on its declared containerPorts and answer
its readiness probe. The dev overlay runs whole (two brokers, the Redis pod,
the simulator) and must include its Namespace; the quickstart's curl (docs/DEPLOYING.md) then goes
through the token-broker Service and must get a token. The production
overlay's broker runs against a Redis and an API server that are not here,
which it must tolerate; its API port must speak HTTPS with the Certificate's
names, checked through the token-broker Service.

    python3 deploy/tests/kubelet.py --binary target/release/token-broker

Exits non-zero with one line per failed check. Everything binds 127.0.0.1,
is bounded in time, and is stopped before it exits.
"""

import argparse
import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
FAILURES = []
# The quickstart's dev caller key (docs/DEPLOYING.md) and the identity its curl asks for.
DEV_CALLER_KEY = "dev-caller-key-not-secret-0123456789abcdef"
DEV_QUERY = "/v1/tokens?email=alice%40example.com&type=AGENT"


def check(condition, message):
    if not condition:
        FAILURES.append(message)
    return condition


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def dockerfile_image():
    """ENTRYPOINT and CMD of the Dockerfile's last stage (exec form)."""
    entrypoint, cmd = [], []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            entrypoint, cmd = [], []
        elif line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line.split(" ", 1)[1])
        elif line.startswith("CMD "):
            cmd = json.loads(line.split(" ", 1)[1])
    return entrypoint, cmd


def image_of(name, binary):
    """(entrypoint, cmd, how to run argv[0]) of an image the overlays use."""
    name = name.split("@")[0]
    if name.split(":")[0].rsplit("/", 1)[-1] == "token-broker":
        entrypoint, cmd = dockerfile_image()
        return entrypoint, cmd, {"/usr/local/bin/token-broker": binary, "token-broker": binary}
    if name.split(":")[0].rsplit("/", 1)[-1] == "redis":
        # The official image: docker-entrypoint.sh runs redis-server when the
        # first argument is an option or a .conf file.
        return ["docker-entrypoint.sh"], ["redis-server"], {"redis-server": shutil.which("redis-server")}
    check(False, f"no local stand-in for the image {name}")
    return [], [], {}


def kubernetes_argv(entrypoint, cmd, container):
    """The argv by Kubernetes' rules for command/args against ENTRYPOINT/CMD."""
    command, args = container.get("command"), container.get("args")
    if command is not None:
        return list(command) + list(args or [])
    if args is not None:
        return list(entrypoint) + list(args)
    return list(entrypoint) + list(cmd)


def expand(text, env):
    """Kubernetes' $(VAR) expansion; $$ escapes, unknown names stay as they are."""
    return re.sub(r"\$\$|\$\((\w+)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placeholder(secret, key):
    if key == "encryption-key":
        return "5e" * 32
    return f"kubelet-check-{secret}-{key}-placeholder"


class Cluster:
    """The objects of one overlay, their values, and the loopback network."""

    def __init__(self, objects, root):
        self.objects = objects
        self.root = root
        self.secrets = {}
        self.config_maps = {}
        # Secret name → the DNS names of the cert-manager Certificate that fills it.
        self.certificates = {}
        for o in objects:
            name = o["metadata"]["name"]
            if o["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
                data.update(o.get("stringData", {}))
                self.secrets[name] = data
            elif o["kind"] == "ConfigMap":
                self.config_maps[name] = dict(o.get("data", {}))
            elif o["kind"] == "Certificate":
                self.certificates[o["spec"]["secretName"]] = o["spec"].get("dnsNames", [])
        # Service name variants → forwarder port, per Service port.
        self.rewrites = []
        self.forwarders = []

    def secret(self, name, key):
        if name in self.certificates and name not in self.secrets:
            self.secrets[name] = self.issue(name, self.certificates[name])
        value = self.secrets.get(name, {}).get(key)
        # Production expects its Secrets to exist: stand-ins here.
        return value if value is not None else placeholder(name, key)

    def config_map(self, name, key):
        data = self.config_maps.get(name)
        if data is None and name == "kube-root-ca.crt" and key == "ca.crt":
            return self.cluster_ca()
        check(data is not None and key in data, f"ConfigMap {name} has {key}")
        return (data or {}).get(key, "")

    def issue(self, name, dns_names):
        """What cert-manager puts in a Certificate's Secret: ca.crt, tls.crt, tls.key."""
        directory = self.root / f"issued-{name}"
        directory.mkdir()
        run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)
        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run("req", "-x509", *curve, "-subj", "/CN=kubelet-check issuer", "-days", "1",
            "-keyout", "ca.key", "-out", "ca.crt")
        run("req", *curve, "-subj", f"/CN={dns_names[0]}", "-keyout", "tls.key", "-out", "tls.csr")
        (directory / "san.ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in dns_names) + "\n")
        run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.ext", "-out", "tls.crt")
        return {key: (directory / key).read_text() for key in ("ca.crt", "tls.crt", "tls.key")}

    def cluster_ca(self):
        key, cert = self.root / "cluster-ca.key", self.root / "cluster-ca.crt"
        if not cert.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-subj", "/CN=kubelet-check", "-days", "1",
                            "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return cert.read_text()

    def rewrite(self, text):
        for pattern, replacement in self.rewrites:
            text = pattern.sub(replacement, text)
        return text


class Pod:
    """One replica of a Deployment, its containers as processes."""

    def __init__(self, cluster, deployment, replica, binary):
        self.cluster = cluster
        self.name = f"{deployment['metadata']['name']}-{replica}"
        self.spec = deployment["spec"]["template"]["spec"]
        self.labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        self.binary = binary
        self.ports = {}  # containerPort → loopback port
        self.named = {}  # port name → containerPort
        for container in self.spec["containers"]:
            for port in container.get("ports", []):
                self.ports[port["containerPort"]] = free_port()
                if "name" in port:
                    self.named[port["name"]] = port["containerPort"]
        self.processes = []

    def port(self, name_or_number):
        number = self.named.get(name_or_number, name_or_number)
        return self.ports.get(number)

    def volumes(self, container, root):
        """Writes the container's mounted volumes under `root`; mountPath → local path."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        paths = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            local = root / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            files = {}
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                items = volume["configMap"].get("items") or [{"key": k, "path": k}
                                                             for k in self.cluster.config_maps.get(name, {})]
                files = {i["path"]: self.cluster.config_map(name, i["key"]) for i in items}
            elif "secret" in volume:
                name = volume["secret"]["secretName"]
                # A Secret the overlay expects to exist: the keys the pod reads from it.
                keys = self.cluster.secrets.get(name) or self.referenced(container, mount["mountPath"])
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in keys]
                check(items, f"{self.name}: Secret {name} has keys to mount")
                files = {i["path"]: self.cluster.secret(name, i["key"]) for i in items}
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "serviceAccountToken" in source:
                        files[source["serviceAccountToken"]["path"]] = "kubelet-check-projected-token"
                    elif "configMap" in source:
                        for item in source["configMap"].get("items", []):
                            files[item["path"]] = self.cluster.config_map(source["configMap"]["name"], item["key"])
            elif "emptyDir" not in volume:
                check(False, f"{self.name}: volume {mount['name']} of a kind this check cannot mount")
            for path, content in files.items():
                (local / path).parent.mkdir(parents=True, exist_ok=True)
                (local / path).write_text(content)
            paths[mount["mountPath"]] = local
        return paths

    def referenced(self, container, mount_path):
        """File names under `mount_path` that the container's args, env or config files name."""
        texts = [str(a) for a in container.get("args", []) + container.get("command", [])]
        texts += [v.get("value", "") for v in container.get("env", [])]
        texts += [t for data in self.cluster.config_maps.values() for t in data.values()]
        pattern = re.compile(rf"{re.escape(mount_path.rstrip('/'))}/([\w.-]+)")
        return sorted({m for text in texts for m in pattern.findall(text)})

    def start(self):
        for container in self.spec["containers"]:
            root = self.cluster.root / self.name / container["name"]
            root.mkdir(parents=True, exist_ok=True)
            mounts = self.volumes(container, root)
            entrypoint, cmd, executables = image_of(container["image"], self.binary)
            env = {}
            for var in container.get("env", []):
                source = var.get("valueFrom", {})
                if "value" in var:
                    value = expand(var["value"], env)
                elif "secretKeyRef" in source:
                    value = self.cluster.secret(source["secretKeyRef"]["name"], source["secretKeyRef"]["key"])
                elif "configMapKeyRef" in source:
                    value = self.cluster.config_map(source["configMapKeyRef"]["name"], source["configMapKeyRef"]["key"])
                else:
                    check(False, f"{self.name}: env {var['name']} from a source this check cannot read")
                    continue
                env[var["name"]] = value
            argv = [expand(a, env) for a in kubernetes_argv(entrypoint, cmd, container)]
            if argv[:1] == ["docker-entrypoint.sh"]:
                rest = argv[1:]
                argv = (["redis-server"] + rest) if rest and rest[0].startswith(("-",)) else rest
                # redis-server listens on 6379 unless told: on this pod's port.
                if "--port" not in argv:
                    argv += ["--port", "6379"]
                argv += ["--bind", "127.0.0.1"]

            # One pass over every mount path, longest first, each ending at a
            # path boundary: /a/b-c is not /a/b followed by -c.
            under_root = re.compile("|".join(rf"{re.escape(m)}(?![\w.-])"
                                             for m in sorted(mounts, key=len, reverse=True))) if mounts else None

            def localise(text):
                if under_root:
                    text = under_root.sub(lambda m: str(mounts[m[0]]), text)
                for container_port, local_port in self.ports.items():
                    text = re.sub(rf"\b0\.0\.0\.0:{container_port}\b", f"127.0.0.1:{local_port}", text)
                return self.cluster.rewrite(text)

            # `--port N` of a container port is this pod's loopback port.
            argv = [str(self.ports.get(int(a), a)) if i and argv[i - 1] == "--port" and a.isdigit() else a
                    for i, a in enumerate(argv)]
            argv = [localise(a) for a in argv]
            env = {k: localise(v) for k, v in env.items()}
            for mount_path, local in mounts.items():
                for file in local.rglob("*"):
                    if file.is_file():
                        file.write_text(localise(file.read_text()))
            executable = executables.get(argv[0]) if argv else None
            if not check(executable, f"{self.name}/{container['name']}: argv {argv[:2]} runs a known program"):
                continue
            log = open(root / "output.log", "w")
            process = subprocess.Popen([executable] + argv[1:], env={"PATH": "/usr/bin:/bin", **env},
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=root)
            self.processes.append((container, process, root / "output.log", argv))

    def check_running(self, deadline):
        for container, process, log, argv in self.processes:
            where = f"{self.name}/{container['name']} ({' '.join(argv[:3])} …)"
            ready = False
            while time.monotonic() < deadline and process.poll() is None:
                if self.ready(container):
                    ready = True
                    break
                time.sleep(0.2)
            if not check(process.poll() is None, f"{where} stays up: exited {process.poll()}: "
                         f"{log.read_text()[-400:]!r}"):
                continue
            check(ready, f"{where}: the readiness probe answers")
            for port in container.get("ports", []):
                with socket.socket() as s:
                    s.settimeout(2)
                    check(s.connect_ex(("127.0.0.1", self.ports[port["containerPort"]])) == 0,
                          f"{where} listens on its containerPort {port['containerPort']}")

    def ready(self, container):
        probe = container.get("readinessProbe")
        if probe is None:
            return True
        if "httpGet" in probe:
            port = self.port(probe["httpGet"]["port"])
            try:
                url = f"http://127.0.0.1:{port}{probe['httpGet'].get('path', '/')}"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    return answer.status == 200
            except OSError:
                return False
        if "tcpSocket" in probe:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self.port(probe["tcpSocket"]["port"]))) == 0
        check(False, f"{self.name}: a readiness probe of a kind this check cannot run")
        return False

    def stop(self):
        for _, process, _, _ in self.processes:
            process.terminate()
        for _, process, _, _ in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


class Forwarder:
    """A Service port: a TCP forwarder on loopback, round robin over its pods."""

    def __init__(self, backends):
        self.backends = backends
        self.turn = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            backend = self.backends[self.turn % len(self.backends)]
            self.turn += 1
            threading.Thread(target=self.pipe, args=(client, backend), daemon=True).start()

    @staticmethod
    def pipe(client, backend):
        try:
            server = socket.create_connection(("127.0.0.1", backend), timeout=5)
        except OSError:
            client.close()
            return

        def pump(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(server, client), daemon=True).start()
        pump(client, server)

    def close(self):
        self.listener.close()


def wire_services(cluster, pods, namespace):
    """Forwarders for every Service port, and the rewrites that name them."""
    for service in (o for o in cluster.objects if o["kind"] == "Service"):
        selector = service["spec"].get("selector", {})
        selected = [p for p in pods if all(p.labels.get(k) == v for k, v in selector.items())]
        name = service["metadata"]["name"]
        if not check(selected, f"Service {name} selects a pod"):
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            backends = [p.port(target) for p in selected if p.port(target)]
            if not check(backends, f"Service {name} port {port['port']} reaches a container port"):
                continue
            forwarder = Forwarder(backends)
            cluster.forwarders.append((name, port["port"], forwarder))
            hosts = [f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc",
                     f"{name}.{namespace}", name]
            for host in hosts:
                cluster.rewrites.append((re.compile(rf"(?<![\w.-]){re.escape(host)}:{port['port']}\b"),
                                         f"127.0.0.1:{forwarder.port}"))


def run_overlay(overlay, binary, whole):
    objects = render(overlay)
    namespace = next((o["metadata"].get("namespace") for o in objects
                      if o["kind"] == "Deployment"), "default")
    if whole:
        check(any(o["kind"] == "Namespace" and o["metadata"]["name"] == namespace for o in objects),
              f"{overlay} creates its Namespace {namespace}, so it applies to an empty cluster")
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(objects, Path(tmp))
        pods = []
        for deployment in (o for o in objects if o["kind"] == "Deployment"):
            for replica in range(deployment["spec"].get("replicas", 1)):
                pods.append(Pod(cluster, deployment, replica, binary))
        wire_services(cluster, pods, namespace)
        try:
            for pod in pods:
                pod.start()
            deadline = time.monotonic() + 30
            for pod in pods:
                pod.check_running(deadline)
            # Running for a while, not only at the first probe.
            time.sleep(2)
            for pod in pods:
                for container, process, log, _ in pod.processes:
                    check(process.poll() is None,
                          f"{overlay}: {pod.name}/{container['name']} is still up after 2 s: {log.read_text()[-400:]!r}")
            if whole:
                curl_through_the_service(cluster)
            if cluster.certificates:
                https_through_the_service(cluster, namespace)
            print(f"{overlay}: {sum(len(p.processes) for p in pods)} containers in {len(pods)} pods run "
                  f"as kubelet would run them, {len(cluster.forwarders)} Service ports wired")
        finally:
            for pod in pods:
                pod.stop()
            for _, _, forwarder in cluster.forwarders:
                forwarder.close()


def curl_through_the_service(cluster):
    """The quickstart's curl, through the token-broker Service, gets a token."""
    port = next((f.port for name, number, f in cluster.forwarders
                 if name == "token-broker" and number == 8080), None)
    if not check(port, "the token-broker Service has port 8080"):
        return
    request = urllib.request.Request(f"http://127.0.0.1:{port}{DEV_QUERY}",
                                     headers={"Authorization": f"Bearer {DEV_CALLER_KEY}"})
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                body = json.loads(answer.read())
                check(answer.status == 200 and body.get("token"), f"the quickstart's curl (docs/DEPLOYING.md) gets a token: {body}")
                return
        except OSError as error:
            if time.monotonic() > deadline:
                check(False, f"the quickstart's curl (docs/DEPLOYING.md) through the token-broker Service: {error}")
                return
            time.sleep(0.5)


def https_through_the_service(cluster, namespace):
    """The API port speaks HTTPS with the Certificate's names, through the Service."""
    port = next((f.port for name, number, f in cluster.forwarders
                 if name == "token-broker" and number == 8080), None)
    secret = next(iter(cluster.certificates))
    if not check(port and secret in cluster.secrets, "the token-broker Service serves the Certificate's Secret"):
        return
    context = ssl.create_default_context(cadata=cluster.secrets[secret]["ca.crt"])
    host = f"token-broker.{namespace}.svc"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(f"GET {DEV_QUERY} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                status = tls.recv(64).decode(errors="replace")
                check(status.startswith("HTTP/1.1 401"),
                      f"HTTPS as {host} answers a caller without a key with 401: {status!r}")
    except (OSError, ssl.SSLError) as error:
        check(False, f"HTTPS through the token-broker Service as {host}: {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, help="the token-broker binary the image holds")
    args = parser.parse_args()
    run_overlay("dev", str(Path(args.binary).resolve()), whole=True)
    run_overlay("production", str(Path(args.binary).resolve()), whole=False)
    for failure in FAILURES:
        print(f"FAIL {failure}")
    print(f"kubelet checks: {'failed' if FAILURES else 'passed'} ({len(FAILURES)} failure(s))")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
