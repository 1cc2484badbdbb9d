#!/usr/bin/env python3
"""Checks the rendered Kubernetes manifests against what the binary does.

Renders every overlay with `kubectl kustomize`, asserts the security, probe
and drain settings of the production overlay (HTTPS from a cert-manager
Certificate, the image pinned by digest; dev plain HTTP said out loud), runs
`token-broker check-config` on the ConfigMap (and sees production refused
without its certificate), starts the binary with that configuration to prove the probe
paths and ports answer, and checks that every alert queries a metric the
binary exports.

    python3 deploy/tests/check_manifests.py --binary target/debug/token-broker

Exits non-zero with one line per failed check. Every server it starts binds
127.0.0.1 and is stopped before it exits.
"""

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["dev", "production"]
FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)
    return condition


def render(overlay):
    return render_dir(KUSTOMIZE / "overlays" / overlay)


def render_dir(path):
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def cluster_values(path):
    """KEY=value lines of an overlay's cluster.env."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0] if found else {}


def broker(objects):
    """The broker Deployment, its pod spec, its container and its env as a dict."""
    deployment = one(objects, "Deployment", "token-broker")
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    container = pod.get("containers", [{}])[0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return deployment, pod, container, env


KUBERNETES_FILES = {
    "TOKEN_BROKER__AUTH__KUBERNETES__JWKS_CA_FILE": "ca.crt",
    "TOKEN_BROKER__AUTH__KUBERNETES__JWKS_TOKEN_FILE": "token",
}

TLS_FILES = {
    "TOKEN_BROKER__SERVER__TLS_CERT_FILE": "tls.crt",
    "TOKEN_BROKER__SERVER__TLS_KEY_FILE": "tls.key",
}

CACHE_FILES = {
    "TOKEN_BROKER__CACHE__ENCRYPTION_KEY_FILE": "encryption-key",
    "TOKEN_BROKER__CACHE__REDIS_PASSWORD_FILE": "redis-password",
}
# Without the redis-password component the Redis has no password.
OPTIONAL_CACHE_FILES = {"TOKEN_BROKER__CACHE__REDIS_PASSWORD_FILE"}


def check_shared_cache(pod, container, env, where):
    """The redis component: cache.* from the environment, secrets as files."""
    check(env.get("TOKEN_BROKER__CACHE__REDIS_URL", "").startswith(("redis://", "rediss://")),
          f"{where}: cache.redis_url is set")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for variable, key in CACHE_FILES.items():
        if variable in OPTIONAL_CACHE_FILES and variable not in env:
            continue
        path = Path(env.get(variable) or "/missing/file")
        mount = mounts.get(str(path.parent), {})
        volume = volumes.get(mount.get("name"), {})
        check(path.name == key and volume.get("secret", {}).get("secretName") == "token-broker-cache"
              and mount.get("readOnly") is True,
              f"{where}: {variable} is the file {key} of the Secret token-broker-cache, mounted read-only")


def check_tls(objects, pod, container, env, namespace):
    """The tls component: a cert-manager Certificate for the Service, its Secret as files."""
    certificate = one(objects, "Certificate", "token-broker-tls")
    spec = certificate.get("spec", {})
    secret = spec.get("secretName")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for variable, key in TLS_FILES.items():
        path = Path(env.get(variable) or "/missing/file")
        mount = mounts.get(str(path.parent), {})
        volume = volumes.get(mount.get("name"), {})
        check(path.name == key and volume.get("secret", {}).get("secretName") == secret
              and mount.get("readOnly") is True,
              f"{variable} is the file {key} of the Certificate's Secret {secret}, mounted read-only")
    names = set(spec.get("dnsNames", []))
    check({f"token-broker.{namespace}.svc", f"token-broker.{namespace}.svc.cluster.local"} <= names,
          f"the certificate names the token-broker Service in {namespace}")
    check("server auth" in spec.get("usages", []), "the certificate is for server auth")
    check(spec.get("issuerRef", {}).get("name"), "the certificate names its issuer")
    renew, duration = duration_seconds(spec.get("renewBefore", "0h")), duration_seconds(spec.get("duration", "0h"))
    check(7 * 24 * 3600 < renew < duration, "renewal starts before the 7-day expiry alert would fire")


def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unsupported duration {text!r}")
    value, unit = int(match[1]), match[2]
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def port_of(container, name_or_number):
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container.get("ports", []):
        if port["name"] == name_or_number:
            return port["containerPort"]
    check(False, f"port {name_or_number!r} is not a container port")
    return None


def check_cluster_values(objects, values, where):
    """Each value of cluster.env lands where it belongs."""
    deployment, pod, container, env = broker(objects)
    policy = one(objects, "NetworkPolicy", "token-broker")
    admin_sources = policy.get("spec", {}).get("ingress", [{}, {}])[1].get("from", [])
    check([s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
           for s in admin_sources] == [values["MONITORING_NAMESPACE"]],
          f"{where}: the admin port admits the monitoring namespace {values['MONITORING_NAMESPACE']}")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        labels = one(objects, kind).get("metadata", {}).get("labels", {})
        check(labels.get("release") == values["PROMETHEUS_RELEASE"],
              f"{where}: the {kind} carries release={values['PROMETHEUS_RELEASE']}")
    check(env.get("TOKEN_BROKER__AUTH__KUBERNETES__ISSUER") == values["KUBERNETES_ISSUER"],
          f"{where}: the service-account issuer is KUBERNETES_ISSUER")
    api = one(objects, "NetworkPolicy", "token-broker-kubernetes-api")
    check(api.get("spec", {}).get("egress", [{}])[0].get("to", [{}])[0].get("ipBlock", {}).get("cidr")
          == values["KUBERNETES_API_SERVER"], f"{where}: egress to the API server is KUBERNETES_API_SERVER")
    check(env.get("TOKEN_BROKER__CACHE__REDIS_URL") == values["REDIS_URL"], f"{where}: the Redis is REDIS_URL")
    check("set-by-cluster-env" not in yaml.safe_dump_all(objects), f"{where}: no placeholder is left")
    return env


def check_production(objects):
    deployment, pod, container, env = broker(objects)
    values = cluster_values(KUSTOMIZE / "overlays" / "production" / "cluster.env")
    check_cluster_values(objects, values, "production")
    check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == values["OTLP_ENDPOINT"],
          "production exports traces to OTLP_ENDPOINT")
    config_map = one(objects, "ConfigMap")
    config = tomllib.loads(config_map["data"]["token-broker.toml"])
    check(not config["upstream"].get("allow_insecure_http", False)
          and config["upstream"].get("base_url", "https://").startswith("https://"),
          "production talks to the vendor over https only")
    check_shared_cache(pod, container, env, "production")
    check_tls(objects, pod, container, env, deployment["metadata"].get("namespace", "default"))
    check(not config["server"].get("plaintext", False), "production does not serve plain HTTP")
    image = container.get("image", "")
    check(re.search(r"@sha256:[0-9a-f]{64}$", image) is not None,
          f"the production image is pinned by digest, not a tag: {image}")

    check(deployment["spec"]["replicas"] >= 2, "production runs at least 2 replicas")
    hpa = one(objects, "HorizontalPodAutoscaler")
    check(hpa["spec"]["minReplicas"] >= 2, "the HPA keeps at least 2 replicas")
    check(hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], "the HPA scales the Deployment")

    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True, "pod runAsNonRoot")
    check(security.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccomp RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False, "pod does not mount a service account token")
    account = one(objects, "ServiceAccount")
    check(account.get("automountServiceAccountToken") is False, "service account does not automount its token")
    check(pod.get("serviceAccountName") == account["metadata"]["name"], "pod uses the ServiceAccount")
    csec = container.get("securityContext", {})
    check(csec.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check(csec.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    check(csec.get("capabilities", {}).get("drop") == ["ALL"], "all capabilities dropped")
    check(csec.get("runAsNonRoot", security.get("runAsNonRoot")) is True, "container runs as non-root")
    check(all(container["resources"].get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")),
          "cpu and memory requests and limits are set")
    spread = pod.get("topologySpreadConstraints", [])
    check(any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread), "replicas spread across nodes")

    # Ports and probes match the configuration the binary reads.
    api_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    admin_port = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
    check(port_of(container, "api") == api_port, "container port api matches server.listen")
    check(port_of(container, "admin") == admin_port, "container port admin matches server.admin_listen")
    probes = {}
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", None)):
        probe = container.get(kind)
        if not check(probe is not None, f"{kind} is set"):
            continue
        get = probe["httpGet"]
        check(port_of(container, get["port"]) == admin_port, f"{kind} uses the admin port")
        if path:
            check(get["path"] == path, f"{kind} path is {path}")
        probes[kind] = get["path"]

    # Draining: the preStop pause and shutdown_grace fit in the grace period.
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    check(pause is not None and pause > 0, "a preStop sleep lets endpoints drain first")
    grace = duration_seconds(config["server"].get("shutdown_grace", "20s"))
    check(pod["terminationGracePeriodSeconds"] > grace + (pause or 0),
          "terminationGracePeriodSeconds exceeds shutdown_grace plus the preStop pause")

    # Configuration and secrets are mounted files.
    args = container.get("args", [])
    check("--config" in args, "the container is given --config")
    config_path = Path(args[args.index("--config") + 1]) if "--config" in args else None
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def mounted_from(path):
        for name, mount in mounts.items():
            if path and Path(path).parent == Path(mount["mountPath"]):
                return volumes.get(name, {}), mount
        return {}, {}

    volume, mount = mounted_from(config_path)
    check(volume.get("configMap", {}).get("name") == config_map["metadata"]["name"],
          "--config is a file of the ConfigMap")
    check(config_path is not None and config_path.name in config_map["data"], "the ConfigMap holds the --config file")
    for key in ("partner_key_file",):
        path = config["upstream"].get(key)
        check(path is not None, "the partner key is read from a file")
        volume, mount = mounted_from(path)
        check(volume.get("secret", {}).get("secretName") == "token-broker-partner-key",
              f"upstream.{key} is a file of the Secret token-broker-partner-key")
        check(mount.get("readOnly") is True, "the Secret is mounted read-only")
    audit_path = config.get("audit", {}).get("hash_key_file")
    volume, _ = mounted_from(audit_path)
    check(volume.get("secret", {}).get("secretName") == "token-broker-partner-key",
          "audit.hash_key_file is a file of the same Secret")
    check(not [o for o in objects if o["kind"] == "Secret"], "production commits no Secret; it must exist")

    # Services: callers reach the API port only; the admin port has its own.
    service = one(objects, "Service", "token-broker")
    admin_service = one(objects, "Service", "token-broker-admin")
    service_ports = [port_of(container, p["targetPort"]) for p in service.get("spec", {}).get("ports", [])]
    admin_ports = [port_of(container, p["targetPort"]) for p in admin_service.get("spec", {}).get("ports", [])]
    check(service_ports == [api_port], "the Service callers use exposes the api port only")
    check(admin_ports == [admin_port], "the admin port has a Service of its own")
    pdb = one(objects, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in selector.items()), "the PodDisruptionBudget selects the pods")
    policy = one(objects, "NetworkPolicy", "token-broker")
    spec = policy["spec"]
    check(set(spec["policyTypes"]) == {"Ingress", "Egress"}, "the NetworkPolicy governs ingress and egress")
    ingress_ports = {port_of(container, p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    check(ingress_ports == {api_port, admin_port}, "ingress is only to the api and admin ports")
    for rule in spec["ingress"]:
        ports = {port_of(container, p["port"]) for p in rule["ports"]}
        sources = rule.get("from", [])
        check(bool(sources), "every ingress rule names its sources")
        if ports == {admin_port}:
            check(all(s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                      == values["MONITORING_NAMESPACE"] for s in sources),
                  "the admin port admits only the monitoring namespace")
        else:
            check(all("token-broker.io/client" in str(s) for s in sources), "the api port admits only labelled clients")
    egress_ports = {(p["port"], p.get("protocol", "TCP")) for rule in spec["egress"] for p in rule["ports"]}
    check(egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP")}, "egress is DNS and HTTPS only")
    for rule in spec["egress"]:
        if any(p["port"] == 443 for p in rule["ports"]):
            blocks = [peer.get("ipBlock") for peer in rule.get("to", [])]
            check(bool(blocks) and all(blocks), "HTTPS egress names its destinations as ipBlocks")
            v4 = [b for b in blocks if b and b["cidr"] == "0.0.0.0/0"]
            check(bool(v4) and {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(v4[0].get("except", [])),
                  "HTTPS egress excludes the in-cluster (private) ranges: no API server, no other services")
    otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if otlp:
        port = int(re.search(r":(\d+)", otlp.split("//", 1)[-1]).group(1))
        opened = {p["port"] for o in objects if o["kind"] == "NetworkPolicy"
                  for r in o["spec"].get("egress", []) for p in r["ports"]}
        check(port in opened, f"egress to the OTLP collector port {port} is open")

    # Monitoring objects.
    monitor = one(objects, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    check(endpoint["port"] == "admin" and endpoint.get("path") == "/metrics", "the ServiceMonitor scrapes admin /metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selects = lambda svc: all(svc["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
    check(selects(admin_service) and not selects(service),
          "the ServiceMonitor selects the admin Service, not the one callers use")
    rules = one(objects, "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}
    for alert in ("TokenBrokerUpstreamErrors", "TokenBrokerCircuitOpen", "TokenBroker5xxRising",
                  "TokenBrokerLowHitRatio", "TokenBrokerPodsNotReady", "TokenBrokerSharedCacheDown",
                  "TokenBrokerCertificateExpiresSoon", "TokenBrokerCertificateReloadFailed",
                  "TokenBrokerSharedCacheRolledBack"):
        check(alert in alerts, f"alert {alert} exists")
    # Service-account callers: the JWKS from the API server, with a projected
    # token and CA, and egress to the API server's address only.
    check(env.get("TOKEN_BROKER__AUTH__KUBERNETES__JWKS_URL", "").startswith("https://"),
          "production verifies service-account tokens against the cluster's JWKS over HTTPS")
    check(bool(env.get("TOKEN_BROKER__AUTH__KUBERNETES__ISSUER")), "the service-account issuer is set")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for variable, name in KUBERNETES_FILES.items():
        path = Path(env.get(variable) or "/missing/file")
        volume = volumes.get(mounts.get(str(path.parent), {}).get("name"), {})
        sources = volume.get("projected", {}).get("sources", [])
        check(path.name == name and any("serviceAccountToken" in s or "configMap" in s for s in sources),
              f"{variable} is a file of the projected API-server volume")
    api_egress = one(objects, "NetworkPolicy", "token-broker-kubernetes-api")
    blocks = [peer.get("ipBlock", {}).get("cidr", "") for r in api_egress.get("spec", {}).get("egress", [])
              for peer in r.get("to", [])]
    check(blocks and all(b.endswith("/32") for b in blocks), "API-server egress is to one address only")
    redis_egress = one(objects, "NetworkPolicy", "token-broker-redis")
    check({p["port"] for r in redis_egress.get("spec", {}).get("egress", []) for p in r["ports"]} == {6379, 26379},
          "the redis component opens egress to Redis on 6379 and to sentinels on 26379 only")
    return config_map["data"]["token-broker.toml"], env, probes, admin_port, alerts


DEV_CALLER_KEY = "dev-caller-key-not-secret-0123456789abcdef"


def check_dev(objects):
    """A complete environment: two brokers, one Redis pod, the simulator."""
    deployment, pod, container, env = broker(objects)
    check(deployment.get("spec", {}).get("replicas") == 2, "dev runs two broker replicas")
    check_shared_cache(pod, container, env, "dev")
    redis = one(objects, "Deployment", "token-broker-redis")
    redis_service = one(objects, "Service", "token-broker-redis")
    check(env.get("TOKEN_BROKER__CACHE__REDIS_URL") == "redis://token-broker-redis:6379"
          and redis_service.get("spec", {}).get("ports", [{}])[0].get("port") == 6379,
          "dev brokers use the dev Redis Service")
    redis_args = redis.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0].get("args", [])
    check("--requirepass" in redis_args, "the dev Redis requires the password the brokers read")
    simulator = one(objects, "Deployment", "token-broker-simulator")
    sim_args = simulator.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0].get("args", [])
    check(sim_args[:1] == ["simulate-upstream"], "the dev vendor is token-broker simulate-upstream")
    check(one(objects, "Service", "token-broker-simulator").get("spec", {}).get("ports", [{}])[0].get("port") == 8081,
          "the simulator Service listens on 8081")
    config = tomllib.loads(one(objects, "ConfigMap")["data"]["token-broker.toml"])
    check(config["server"].get("plaintext") is True and not any(e.startswith("TOKEN_BROKER__SERVER__TLS") for e in env),
          "dev serves plain HTTP, said out loud (no cert-manager on an empty cluster)")
    check(config["upstream"]["base_url"] == "http://token-broker-simulator:8081"
          and config["upstream"].get("allow_insecure_http") is True,
          "dev brokers ask the simulator, over http allowed in dev only")
    digest = hashlib.sha256(DEV_CALLER_KEY.encode()).hexdigest()
    check(any(c["key_sha256"] == digest for c in config.get("clients", [])),
          "the dev caller key the quickstart shows is configured")
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    check({"token-broker-partner-key", "token-broker-cache"} <= secrets, "dev generates its placeholder Secrets")
    egress = {(p["port"]) for o in objects if o["kind"] == "NetworkPolicy"
              for r in o["spec"].get("egress", []) for p in r["ports"]}
    check({8081, 6379} <= egress, "dev brokers may reach the simulator and Redis")
    return one(objects, "ConfigMap")["data"]["token-broker.toml"], env


VARIANT = {
    "KUBERNETES_ISSUER": "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
    "KUBERNETES_API_SERVER": "172.20.0.1/32",
    "REDIS_URL": "rediss://master.tokens.abc123.euw1.cache.amazonaws.com:6379",
    "REDIS_CIDR": "10.40.0.0/16",
    "MONITORING_NAMESPACE": "observability",
    "PROMETHEUS_RELEASE": "prom",
    "OTLP_ENDPOINT": "unused-without-the-otlp-component",
}


def render_variant():
    """The production overlay as another cluster would set it: another issuer
    and API server, no trace export, a managed Redis outside the cluster
    without a password, another monitoring namespace and release label. Made
    as docs/DEPLOYING.md says: cluster.env and the components list, nothing else."""
    production = KUSTOMIZE / "overlays" / "production"
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "variant"
        shutil.copytree(production, variant)
        text = (variant / "kustomization.yaml").read_text()
        # The copy lives elsewhere: the same base and components, found from there.
        text = text.replace("../../", os.path.relpath(KUSTOMIZE, variant) + "/")
        lines = []
        for line in text.splitlines():
            if re.fullmatch(r"\s*- \S*components/(otlp|redis-password)", line):
                continue
            lines.append(re.sub(r"^(\s*)# (- \S*components/redis-external)\b.*", r"\1\2", line))
        (variant / "kustomization.yaml").write_text("\n".join(lines) + "\n")
        (variant / "cluster.env").write_text("".join(f"{k}={v}\n" for k, v in VARIANT.items()))
        return render_dir(variant)


def check_variant(binary, objects):
    deployment, pod, container, env = broker(objects)
    check_cluster_values(objects, VARIANT, "variant")
    check("OTEL_EXPORTER_OTLP_ENDPOINT" not in env and not [o for o in objects if o["metadata"]["name"] == "token-broker-otlp"],
          "variant: without the otlp component, no trace export and no egress for it")
    check("TOKEN_BROKER__CACHE__REDIS_PASSWORD_FILE" not in env,
          "variant: without the redis-password component, no password file")
    external = one(objects, "NetworkPolicy", "token-broker-redis-external")
    rule = external.get("spec", {}).get("egress", [{}])[0]
    check(rule.get("to", [{}])[0].get("ipBlock", {}).get("cidr") == VARIANT["REDIS_CIDR"]
          and {p["port"] for p in rule.get("ports", [])} == {6379, 6380},
          "variant: egress to the external Redis is REDIS_CIDR on 6379 and 6380")
    config_text = one(objects, "ConfigMap")["data"]["token-broker.toml"]
    check_config_accepts(binary, "variant", config_text, env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp, config_text, container_env):
    """The process environment of the container, its mounted files in `tmp`."""
    config_file = tmp / "token-broker.toml"
    config_file.write_text(config_text)
    (tmp / "partner-key").write_text("check-manifests-partner-key\n")
    (tmp / "audit-hash-key").write_text("check-manifests-audit-key-0123456789\n")
    (tmp / "encryption-key").write_text("42" * 32 + "\n")
    (tmp / "redis-password").write_text("check-manifests-redis-password\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKEN_BROKER", "OTEL_"))}
    env.update({k: v for k, v in container_env.items() if k.startswith("TOKEN_BROKER__") and v})
    # Only the mount paths differ from the cluster.
    env["TOKEN_BROKER__UPSTREAM__PARTNER_KEY_FILE"] = str(tmp / "partner-key")
    env["TOKEN_BROKER__AUDIT__HASH_KEY_FILE"] = str(tmp / "audit-hash-key")
    for variable, key in CACHE_FILES.items():
        if variable in env:
            env[variable] = str(tmp / key)
    if "TOKEN_BROKER__SERVER__TLS_CERT_FILE" in env:
        # What cert-manager would put in the Secret: a key and its certificate.
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-days", "1", "-keyout", str(tmp / "tls.key"), "-out", str(tmp / "tls.crt")],
                       check=True, capture_output=True)
        for variable, name in TLS_FILES.items():
            env[variable] = str(tmp / name)
    if "TOKEN_BROKER__AUTH__KUBERNETES__JWKS_CA_FILE" in env:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=check-manifests", "-days", "1",
                        "-keyout", str(tmp / "ca.key"), "-out", str(tmp / "ca.crt")],
                       check=True, capture_output=True)
        (tmp / "token").write_text("check-manifests-token\n")
        for variable, name in KUBERNETES_FILES.items():
            env[variable] = str(tmp / name)
    return config_file, env


def check_plain_http_refused(binary, config_text, container_env):
    """Without the tls component, the production configuration does not start."""
    plain = {k: v for k, v in container_env.items() if k not in TLS_FILES}
    with tempfile.TemporaryDirectory() as tmp:
        config_file, env = environment(Path(tmp), config_text, plain)
        result = subprocess.run([binary, "check-config", "--config", str(config_file)],
                                env=env, capture_output=True, text=True, timeout=30)
        check(result.returncode == 2 and "server.tls_cert_file" in result.stderr,
              f"production without a certificate is refused naming server.tls_cert_file: {result.stderr.strip()}")


def check_config_accepts(binary, overlay, config_text, container_env):
    with tempfile.TemporaryDirectory() as tmp:
        config_file, env = environment(Path(tmp), config_text, container_env)
        result = subprocess.run([binary, "check-config", "--config", str(config_file)],
                                env=env, capture_output=True, text=True, timeout=30)
        check(result.returncode == 0, f"check-config accepts the {overlay} configuration: {result.stderr.strip()}")
        for secret in ("check-manifests-redis-password", "42" * 32):
            check(secret not in result.stdout + result.stderr, f"check-config of {overlay} prints no secret")


def check_against_binary(binary, config_text, container_env, probes, alerts):
    with tempfile.TemporaryDirectory() as tmp:
        config_file, env = environment(Path(tmp), config_text, container_env)

        admin = free_port()
        env["TOKEN_BROKER__SERVER__LISTEN"] = f"127.0.0.1:{free_port()}"
        env["TOKEN_BROKER__SERVER__ADMIN_LISTEN"] = f"127.0.0.1:{admin}"
        process = subprocess.Popen([binary, "serve", "--config", str(config_file)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            metrics = ""
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            for kind, path in probes.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=2) as answer:
                        check(answer.status == 200, f"{kind} {path} answers 200")
                except OSError as error:
                    check(False, f"{kind} {path} on the admin port: {error}")
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as answer:
                metrics = answer.read().decode()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = None
            check(code == 0, f"the broker stops cleanly on SIGTERM (exit {code})")
        exported = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line and line[0] != "#"}
        for alert, expr in alerts.items():
            for name in re.findall(r"\b(token_broker_[a-z_]+)", expr):
                check(name in exported, f"alert {alert} queries {name}, which the binary does not export")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, help="the token-broker binary to check against")
    args = parser.parse_args()
    rendered = {overlay: render(overlay) for overlay in OVERLAYS}
    config_text, env, probes, _, alerts = check_production(rendered["production"])
    dev_config, dev_env = check_dev(rendered["dev"])
    check_config_accepts(args.binary, "production", config_text, env)
    check_config_accepts(args.binary, "dev", dev_config, dev_env)
    check_plain_http_refused(args.binary, config_text, env)
    check_variant(args.binary, render_variant())
    # Redis is not reachable here: the broker must start and be ready anyway.
    check_against_binary(args.binary, config_text, env, probes, alerts)
    for failure in FAILURES:
        print(f"FAIL {failure}")
    checks = "manifest checks"
    print(f"{checks}: {'failed' if FAILURES else 'passed'} ({len(FAILURES)} failure(s))")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
