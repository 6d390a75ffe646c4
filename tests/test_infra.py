"""infra/: static checks of the Dockerfiles, KubeRay/launcher manifests, MLflow deployment and README commands,
plus (``-m integration``) a real two-node Ray cluster on this machine running ``gan-pipeline train`` directly and
through ``ray job submit`` against a real MLflow server.

Nothing here needs Docker or Kubernetes; the manifests are parsed and checked against what operators and the
CLI actually accept (``pipelines.cli.cli``, ``ray start``, ``mlflow server`` click definitions).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """infra/VERSION: the one place the image tags and pinned versions are defined."""
    out = {}
    for line in (INFRA / "VERSION").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in load_docs(p) if p.name != "kustomization.yaml"]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_objects() if d.get("kind") == kind]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a k8s object."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]["spec"]
    elif obj["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]
        if "rayClusterSpec" in spec:
            yield from pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    elif "template" in spec:
        yield obj["kind"], spec["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


# ---- the CLI checker: every `gan-pipeline ...` line in infra/ must use real subcommands and options -----------------
CMD_RE = re.compile(r"(?<![\w/.:-])(?<!-n )(?<!--namespace )gan-pipeline[ \t]+(?P<rest>[a-z][^`]*)")  # ` ends inline code
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", ")", "`"}


def _options_of(command: click.Command) -> set[str]:
    opts = {"--help", "-h"}
    for param in command.params:
        opts.update(param.opts)
        opts.update(param.secondary_opts)
    return opts


def check_cli_line(line: str, cli: Optional[click.Group] = None, prog: str = "gan-pipeline") -> list[str]:
    """Problems with one command line ``<prog> <subcommand> [options]`` (empty list: it is valid)."""
    if cli is None:
        from pipelines.cli import cli
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:
        return [f"{line!r}: cannot be parsed ({exc})"]
    if prog in tokens:
        tokens = tokens[tokens.index(prog) + 1:]
    for i, tok in enumerate(tokens):
        if tok in SHELL_STOP:
            tokens = tokens[:i]
            break
    command: click.Command = cli
    path = []
    while isinstance(command, click.Group):
        if not tokens or tokens[0].startswith("-"):
            return [] if tokens and tokens[0] in ("--help", "-h", "--version") else [f"{line!r}: no subcommand"]
        name, tokens = tokens[0], tokens[1:]
        if name not in command.commands:
            return [f"{line!r}: unknown subcommand {' '.join(path + [name])!r}"]
        path.append(name)
        command = command.commands[name]
    known = _options_of(command)
    problems = []
    for tok in tokens:
        if tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-\d.*", tok):
            opt = tok.split("=", 1)[0]
            if opt not in known:
                problems.append(f"{line!r}: {prog} {' '.join(path)} has no option {opt}")
    return problems


def logical_lines(text: str) -> Iterator[str]:
    """Lines with shell continuations (``\\`` at the end) joined."""
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        yield buf + line
        buf = ""
    if buf:
        yield buf


def gan_pipeline_commands() -> list[tuple[str, str]]:
    """(file, command line) of every ``gan-pipeline <sub> ...`` in infra/ (YAML scalars and text, README code)."""
    found = []
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml", ".md", "") and "Dockerfile" not in path.name:
            continue
        text = path.read_text()
        chunks = list(logical_lines(text))
        if path.suffix in (".yaml", ".yml"):
            for doc in load_docs(path):
                chunks.extend(s.replace("\n", " ") for s in strings(doc))
        for chunk in chunks:
            for match in CMD_RE.finditer(chunk):
                found.append((str(path.relative_to(ROOT)), "gan-pipeline " + match.group("rest")))
    return found


# ----------------------------------------------------------------------------------------------------------------
# static checks
# ----------------------------------------------------------------------------------------------------------------
EXPECTED = [
    "VERSION", "README.md", "docker/Dockerfile", "docker/Dockerfile.cuda", "docker/.dockerignore",
    "k8s/kustomization.yaml", "k8s/raycluster.yaml", "k8s/rayjob-run.yaml", "k8s/rayjob-tune.yaml",
    "k8s/storage-pvc.yaml", "k8s/config.yaml", "k8s/mlflow.yaml", "k8s/mlflow-secrets.example.yaml",
    "ray/cluster.yaml", "mlflow/docker-compose.yaml", "mlflow/.env.example", "mlflow/auth.ini", "mlflow/Dockerfile",
]


@pytest.mark.parametrize("rel", EXPECTED)
def test_file_exists(rel):
    assert (INFRA / rel).is_file(), rel


def test_every_yaml_parses():
    files = yaml_files()
    assert len(files) >= 10
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_versions_agree_with_installed_ray_and_dockerfiles():
    import ray

    v = versions()
    assert v["RAY_VERSION"] == ray.__version__
    for key in ("IMAGE", "IMAGE_CUDA"):
        assert f"ray{v['RAY_VERSION']}" in v[key], f"{key} tag should name the Ray version"
    for name, base in (("Dockerfile", "-py311"), ("Dockerfile.cuda", "-py311-gpu")):
        text = (INFRA / "docker" / name).read_text()
        assert f"ARG RAY_VERSION={v['RAY_VERSION']}\n" in text, name
        assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}" + re.escape(base) + r"\s*$", text, re.M), name
        assert f"ARG TORCH_VERSION={v['TORCH_VERSION']}\n" in text, name
        assert f"ARG TORCHVISION_VERSION={v['TORCHVISION_VERSION']}\n" in text, name
        assert f"ARG MLFLOW_VERSION={v['MLFLOW_VERSION']}\n" in text, name
        assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text, name
        assert any(re.search(r"pip install .* \.(\s|$)", line) for line in logical_lines(text)), \
            f"{name} must `pip install .` the repo"
        assert not re.search(r"^\s*(ENTRYPOINT|CMD)\b", text, re.M), f"{name}: no entrypoint (Ray operators run it)"
    assert "download.pytorch.org/whl/cpu" in (INFRA / "docker" / "Dockerfile").read_text()
    assert "whl/cpu" not in (INFRA / "docker" / "Dockerfile.cuda").read_text()


def test_installed_versions_match_pins():
    import mlflow
    import torch
    import torchvision

    v = versions()
    assert torch.__version__.split("+")[0] == v["TORCH_VERSION"]
    assert torchvision.__version__.split("+")[0] == v["TORCHVISION_VERSION"]
    assert mlflow.__version__ == v["MLFLOW_VERSION"]
    assert f"mlflow-server:{v['MLFLOW_VERSION']}" in v["MLFLOW_IMAGE"]


def test_images_are_the_ones_defined_in_VERSION():
    v = versions()
    allowed = {v["IMAGE"], v["IMAGE_CUDA"], v["MLFLOW_IMAGE"]}
    repos = {img.rsplit(":", 1)[0] for img in allowed}
    seen = set()
    for path in yaml_files():
        for doc in load_docs(path):
            for s in strings(doc):
                for img in re.findall(r"[\w.-]+/[\w./-]+:[\w.-]+", s):
                    if img.rsplit(":", 1)[0] in repos:
                        assert img in allowed, f"{path}: image {img} is not one of infra/VERSION's"
                        seen.add(img)
        # `image:` keys too (all of them, project or third-party, must carry a pinned tag, never :latest)
        for m in re.finditer(r"^\s*-?\s*(?:image|head_image|worker_image):\s*(\S+)", path.read_text(), re.M):
            img = m.group(1)
            assert ":" in img and not img.endswith(":latest"), f"{path}: unpinned image {img}"
    assert seen == allowed
    # the Dockerfiles' documented build tags are the same
    assert v["IMAGE"] in (INFRA / "docker" / "Dockerfile").read_text()
    assert v["IMAGE_CUDA"] in (INFRA / "docker" / "Dockerfile.cuda").read_text()
    assert v["MLFLOW_IMAGE"] in (INFRA / "mlflow" / "Dockerfile").read_text()


def test_raycluster_has_what_kuberay_needs():
    from ray.scripts.scripts import start as ray_start

    v = versions()
    start_opts = {o.lstrip("-") for p in ray_start.params for o in p.opts}
    (cluster,) = by_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert str(cluster["spec"]["rayVersion"]) == v["RAY_VERSION"]
    head = cluster["spec"]["headGroupSpec"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu"}
    for where, params in [("head", head["rayStartParams"])] + [(g["groupName"], g["rayStartParams"]) for g in groups]:
        assert isinstance(params, dict), where
        for key, value in params.items():
            assert key in start_opts, f"{where}: rayStartParams {key!r} is not a `ray start` option"
            assert isinstance(value, str), f"{where}: rayStartParams values must be strings ({key})"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    for where, pod in pod_specs(cluster):
        (ctr,) = pod["containers"]
        expected = v["IMAGE_CUDA"] if where.endswith("gpu") else v["IMAGE"]
        assert ctr["image"] == expected, where
        res = ctr["resources"]
        assert res["requests"] and res["limits"], f"{where}: requests AND limits"
        for key in ("cpu", "memory"):
            assert key in res["requests"] and key in res["limits"], f"{where}: {key}"
        if where.endswith("gpu"):
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        assert {"configMapRef": {"name": "gan-pipeline-config"}} in ctr["envFrom"], where
        env = {e["name"]: e for e in ctr["env"]}
        # Ray 2.60 turns token auth on at `ray start --head`: every node must present the same token.
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token", where
        assert "MLFLOW_TRACKING_URI" not in env, f"{where}: the tracking URI comes from the ConfigMap only"
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client-credentials", where
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        assert mounts.get("/mnt/shared") == "shared", f"{where}: shared storage mounted"
        claims = {vol["name"]: vol.get("persistentVolumeClaim", {}).get("claimName") for vol in pod["volumes"]}
        assert claims["shared"] == "gan-pipeline-shared", where


def test_storage_is_configured_in_one_place():
    (config,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "gan-pipeline-config"]
    data = config["data"]
    assert data["STORAGE_PATH"].startswith(("s3://", "/mnt/shared/"))
    assert data["RUNS_DIR"].startswith(("s3://", "/mnt/shared/"))
    assert data["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    (pvc,) = [p for p in by_kind("PersistentVolumeClaim") if p["metadata"]["name"] == "gan-pipeline-shared"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # nobody else names a storage location: every --storage-path in k8s/ is $STORAGE_PATH
    for path, doc in k8s_objects():
        for s in strings(doc):
            for value in re.findall(r"--storage-path[ =](\S+)", s):
                assert value == "$STORAGE_PATH", f"{path}: --storage-path {value}"
            for value in re.findall(r"--runs-dir[ =](\S+)", s):
                assert value == "$RUNS_DIR", f"{path}: --runs-dir {value}"
            assert "--tracking-uri http" not in s, f"{path}: tracking URI hard-coded"
    # the launcher names it once too
    launcher = (INFRA / "ray" / "cluster.yaml").read_text()
    assert len(re.findall(r"STORAGE_PATH=", launcher)) == 1


def test_rayjobs():
    jobs = {j["metadata"]["name"]: j for j in by_kind("RayJob")}
    assert len(jobs) == 2
    (cluster,) = by_kind("RayCluster")
    entrypoints = {}
    for name, job in jobs.items():
        assert job["apiVersion"] == "ray.io/v1"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        entry = job["spec"]["entrypoint"]
        tokens = shlex.split(entry)
        assert tokens[0] == "gan-pipeline"
        assert "--address" in tokens and tokens[tokens.index("--address") + 1] == "auto"
        assert tokens[tokens.index("--storage-path") + 1] == "$STORAGE_PATH"
        entrypoints[tokens[1]] = tokens
        for where, pod in pod_specs(job):
            for ctr in containers(pod):
                assert ctr["resources"]["requests"] and ctr["resources"]["limits"], f"{name} {where}"
                env = {e["name"] for e in ctr.get("env", [])}
                assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env, f"{name} {where}: Ray token for the dashboard"
    run = entrypoints["run"]
    assert run[run.index("--model") + 1] == "wgan" and run[run.index("--workers") + 1] == "4"
    assert "tune" in entrypoints


def test_kustomization_ties_everything_together():
    kust = load_docs(K8S / "kustomization.yaml")[0]
    resources = kust["resources"]
    for name in ("raycluster.yaml", "rayjob-run.yaml", "rayjob-tune.yaml", "storage-pvc.yaml", "mlflow.yaml",
                 "config.yaml"):
        assert name in resources
    for name in resources:
        assert (K8S / name).is_file(), name
        assert "example" not in name, f"example secrets must never be applied: {name}"
    namespaced = {d["metadata"].get("namespace") for _, d in k8s_objects()}
    assert namespaced == {None}, "the namespace is set once, by kustomization.yaml"


def test_mlflow_k8s_is_internal_and_uses_secrets_by_name():
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert services["mlflow"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    for svc in services.values():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    assert by_kind("StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    assert {"mlflow", "mlflow-minio"} <= set(deployments)
    mlflow_pod = deployments["mlflow"]["spec"]["template"]["spec"]
    (server,) = mlflow_pod["containers"]
    args = server["args"]
    check_mlflow_server_args(args)
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    assert "mc mb" in " ".join(strings(mlflow_pod["initContainers"]))
    secret_refs = {ref["name"] for doc in by_kind("Deployment") + by_kind("StatefulSet")
                   for ref in _secret_refs(doc)}
    assert {"mlflow-postgres", "mlflow-minio", "mlflow-server"} <= secret_refs
    # no Secret objects are applied from the real manifests; the example file is clearly an example
    assert not [p for p, d in k8s_objects() if d["kind"] == "Secret" and "example" not in p.name]
    for doc in load_docs(K8S / "mlflow-secrets.example.yaml"):
        assert doc["metadata"]["annotations"]["example"] == "true"
        for key, value in doc["stringData"].items():
            assert "EXAMPLE" in value or not re.search(r"PASSWORD|SECRET|TOKEN", key), key
    assert "EXAMPLE ONLY" in (K8S / "mlflow-secrets.example.yaml").read_text()


def _secret_refs(node) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef"):
                yield value
            else:
                yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)


def check_mlflow_server_args(args: list[str]) -> None:
    """Every flag is a real ``mlflow server`` option, and the deployment is the one asked for."""
    from mlflow.cli import server

    known = _options_of(server)
    tokens = list(args)
    if tokens[:2] == ["mlflow", "server"]:
        tokens = tokens[2:]
    for tok in tokens:
        if tok.startswith("--"):
            assert tok.split("=", 1)[0] in known, f"mlflow server has no option {tok}"
    joined = " ".join(tokens)
    assert "--serve-artifacts" in tokens
    assert re.search(r"--artifacts-destination[ =]s3://mlflow/?", joined)
    assert re.search(r"--app-name[ =]basic-auth", joined)
    assert re.search(r"--backend-store-uri[ =]postgresql://", joined)


def test_mlflow_compose():
    compose = load_docs(INFRA / "mlflow" / "docker-compose.yaml")[0]
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    init = services["minio-init"]
    assert "mc mb" in " ".join(strings(init["entrypoint"])) and "local/mlflow" in " ".join(strings(init["entrypoint"]))
    server = services["mlflow"]
    check_mlflow_server_args(server["command"])
    assert server["image"] == versions()["MLFLOW_IMAGE"]
    env = server["environment"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/auth.ini"
    assert any("auth.ini:/etc/mlflow/auth.ini" in v for v in server["volumes"])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert server["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    # published on 127.0.0.1 only (by default), Postgres not at all
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${MLFLOW_BIND:-127.0.0.1}:")), f"{name}: {port}"
    assert "ports" not in services["postgres"]
    # secrets: only ${VAR} references, every required one documented in .env.example with a placeholder
    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value.startswith("change-me"), key
    for svc in services.values():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|KEY_ID|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"hard-coded secret {key}"
    auth = (INFRA / "mlflow" / "auth.ini").read_text()
    assert "admin_password" not in auth.replace("# admin_password", "")
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()


def test_launcher_cluster_yaml():
    v = versions()
    cfg = load_docs(INFRA / "ray" / "cluster.yaml")[0]
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu_worker", "gpu_worker"} <= set(types)
    assert cfg["docker"]["image"] == v["IMAGE"]
    assert types["gpu_worker"]["docker"]["worker_image"] == v["IMAGE_CUDA"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert cfg["setup_commands"]
    assert any("RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"])
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    from ray.scripts.scripts import start as ray_start

    for line in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        for part in line.split(";"):
            if "ray start" in part:
                cmd = part[part.index("ray start"):].replace("ray start", "ray-start x", 1)
                group = click.Group(commands={"x": ray_start})
                assert check_cli_line(cmd, group, prog="ray-start") == []


def test_cli_checker_catches_bad_lines():
    assert check_cli_line("gan-pipeline train --workers 2 --storage-path $STORAGE_PATH --max-steps=4") == []
    assert check_cli_line("gan-pipeline models list --tracking-uri http://x") == []
    assert check_cli_line("gan-pipeline --help") == []
    bad = check_cli_line("gan-pipeline train --workers 2 --no-such-flag 1")
    assert len(bad) == 1 and "--no-such-flag" in bad[0]
    assert "unknown subcommand" in check_cli_line("gan-pipeline trian --workers 2")[0]
    assert check_cli_line("gan-pipeline tune --samples 4 --scheduler asha --bogus=1 | tee x") != []
    assert check_cli_line("gan-pipeline prepare --out s3://b/d && gan-pipeline nope") == []  # stops at &&
    # and the extractor finds commands wrapped over lines
    assert list(logical_lines("gan-pipeline run \\\n  --model wgan")) == ["gan-pipeline run    --model wgan"]


def test_every_gan_pipeline_command_in_infra_is_valid():
    commands = gan_pipeline_commands()
    files = {f for f, _ in commands}
    assert {"infra/README.md", "infra/k8s/rayjob-run.yaml", "infra/k8s/rayjob-tune.yaml"} <= files
    subcommands = {shlex.split(c, comments=True)[1] for _, c in commands}
    assert {"run", "tune", "train", "prepare"} <= subcommands
    problems = [f"{f}: {p}" for f, c in commands for p in check_cli_line(c)]
    assert not problems, "\n".join(problems)


def test_readme_covers_the_path():
    text = (INFRA / "README.md").read_text()
    for needle in ("docker build", "docker push", "kubectl apply -k", "port-forward svc/gan-pipeline-head-svc 8265", "port-forward svc/mlflow 5000", "ray job submit",
                   "--address http://127.0.0.1:8265", "MLFLOW_TRACKING_URI", "--storage-path", "gan-pipeline prepare",
                   "--data s3://", "Try it on one machine", "Not tested", "RAY_AUTH_TOKEN"):
        assert needle in text, needle


# ----------------------------------------------------------------------------------------------------------------
# integration: a real two-node Ray cluster + a real MLflow server on this machine
# ----------------------------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _sessions_pids(sids: set[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) in sids:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _kill_sessions(sids: set[int], grace: float = 8.0) -> None:
    """SIGTERM, then SIGKILL, every process of the sessions we started (and only those)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _sessions_pids(sids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + (grace if sig == signal.SIGTERM else 5)
        while time.time() < deadline and _sessions_pids(sids):
            time.sleep(0.5)


def _http_json(url: str, token: Optional[str] = None, timeout: float = 10):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


class LocalCluster:
    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = tempfile.mkdtemp(prefix="gpi-", dir="/tmp")  # short: Unix socket paths <= 107 chars
        self.token = secrets.token_hex(32)
        p = free_ports(20)
        self.gcs_port, self.dashboard_port, self.mlflow_port = p[0], p[1], p[2]
        self.head_ports, self.worker_ports = p[3:11], p[11:19]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.procs: list[subprocess.Popen] = []
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
                                env=self.env(), **kw)
        self.procs.append(proc)
        return proc

    @staticmethod
    def node_ports(ports: list[int]) -> list[str]:
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
        return [f"--{n}={p}" for n, p in zip(names, ports)]

    def start(self) -> None:
        ray = str(BIN / "ray")
        common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                  "--disable-usage-stats"]
        self.spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                              "--default-artifact-root", str(self.root / "mlartifacts"), "--host", "127.0.0.1",
                              "--port", str(self.mlflow_port), "--workers", "1"])
        self.spawn("head", [ray, "start", "--head", f"--port={self.gcs_port}", '--resources={"head": 1}',
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={self.dashboard_port}",
                            f"--ray-client-server-port={self.head_ports[6]}"] + common
                   + self.node_ports(self.head_ports))
        self.wait(lambda: _http_json(f"{self.dashboard}/api/version", self.token), "the Ray head's dashboard", 120)
        self.spawn("node2", [ray, "start", f"--address={self.address}", '--resources={"node2": 1}'] + common
                   + self.node_ports(self.worker_ports))
        self.wait(lambda: len(self.alive_nodes()) == 2 or None, "two alive Ray nodes", 120)
        self.wait(lambda: urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5).status == 200 or None,
                  "the MLflow server", 180)

    def alive_nodes(self) -> list[dict]:
        data = _http_json(f"{self.dashboard}/api/v0/nodes?limit=100", self.token)
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait(self, probe, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[:3]} exited ({proc.returncode}) while waiting for {what}:\n"
                                       f"{self.tail_logs()}")
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"no {what} after {timeout:.0f}s:\n{self.tail_logs()}")

    def tail_logs(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> list[int]:
        """Stop exactly the processes of this cluster (their sessions), not other Ray instances on the machine."""
        sids = {proc.pid for proc in self.procs}
        _kill_sessions(sids)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
        return [int(p) for p in left] + _sessions_pids(sids)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("infra"))
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes of the test cluster still running: {left}"


def train_args(c: LocalCluster, address: str, storage: Path, runs: Path, run_name: str) -> list[str]:
    return ["train", "--address", address, "--workers", "2", "--max-steps", "4", "--checkpoint-every", "2",
            "--batch-size", "16", "--storage-path", str(storage), "--tracking-uri", c.tracking_uri,
            "--runs-dir", str(runs), "--run-name", run_name]


def list_actors(c: LocalCluster, class_name: str) -> list[dict]:
    """Actors of a class, dead ones included (they keep their node_id), from the Ray state API."""
    data = _http_json(f"{c.dashboard}/api/v0/actors?limit=10000&detail=1", c.token, timeout=60)
    return [a for a in data["data"]["result"]["result"] if a["class_name"] == class_name]


def check_training_outcome(c: LocalCluster, storage: Path, run_name: str) -> None:
    ckpts = sorted(p.name for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())
    assert ckpts, f"no checkpoints under {storage / run_name}"
    assert ckpts[-1].endswith("00004"), ckpts  # the last one is step 4 (checkpoint every 2 steps)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=c.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`gan_pipeline.run_name` = '{run_name}'")
    assert len(runs) == 1, run_name
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["gan_pipeline.checkpoint_dir"].startswith(str(storage / run_name))


@pytest.mark.integration
def test_train_on_two_node_cluster(cluster, tmp_path):
    c = cluster
    storage, runs = tmp_path / "shared-checkpoints", tmp_path / "runs"
    before = {a["actor_id"] for a in list_actors(c, "RayTrainWorker")}
    start = time.time()
    proc = subprocess.run([str(BIN / "gan-pipeline")] + train_args(c, c.address, storage, runs, "infra-direct"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=c.env(RAY_ADDRESS=c.address))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"train on the 2-node cluster: {time.time() - start:.0f}s")
    check_training_outcome(c, storage, "infra-direct")
    workers = [a for a in list_actors(c, "RayTrainWorker") if a["actor_id"] not in before]
    assert len(workers) == 2, workers
    nodes = {a["node_id"] for a in workers}
    assert len(nodes) == 2, f"both Train workers on one node: {nodes}"
    assert nodes == {n["node_id"] for n in c.alive_nodes()}


def submit_job(c: LocalCluster, entrypoint: list[str], cwd: Path, timeout: float = 300) -> dict:
    sub_id = f"gpi-{secrets.token_hex(4)}"
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--no-wait",
                          "--submission-id", sub_id, "--"] + entrypoint,
                         capture_output=True, text=True, cwd=cwd, env=c.env(), timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        status = _http_json(f"{c.dashboard}/api/jobs/{sub_id}", c.token)
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = _http_json(f"{c.dashboard}/api/jobs/{sub_id}/logs", c.token).get("logs", "")
    assert status.get("status") == "SUCCEEDED", f"job {sub_id}: {status.get('status')} {status.get('message')}\n" \
                                                f"{logs[-5000:]}"
    return status


@pytest.mark.integration
def test_ray_job_submit_train(cluster, tmp_path):
    # `--address auto` as in the RayJob manifests: inside a job Ray sets RAY_ADDRESS for the driver.
    c = cluster
    storage, runs = tmp_path / "shared-checkpoints", tmp_path / "runs"
    start = time.time()
    submit_job(c, ["gan-pipeline"] + train_args(c, "auto", storage, runs, "infra-job"), tmp_path)
    print(f"ray job submit (train): {time.time() - start:.0f}s")
    check_training_outcome(c, storage, "infra-job")


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("GAN_PIPELINE_INFRA_FULL") != "1",
                    reason="the whole pipeline (evaluate trains a domain classifier) takes minutes here; "
                           "set GAN_PIPELINE_INFRA_FULL=1")
def test_ray_job_submit_run(cluster, tmp_path):
    c = cluster
    config = tmp_path / "small-eval.yaml"
    config.write_text("eval:\n  num_samples: 200\n  classifier_epochs: 1\n  inception: false\n  kid_subset_size: 50\n")
    entry = ["gan-pipeline", "run", "--model", "wgan", "--workers", "2", "--address", "auto", "--max-steps", "4",
             "--checkpoint-every", "2", "--batch-size", "16", "--storage-path", str(tmp_path / "shared-checkpoints"),
             "--tracking-uri", c.tracking_uri, "--runs-dir", str(tmp_path / "runs"), "--config", str(config),
             "--run-name", "infra-run"]
    assert check_cli_line(shlex.join(entry)) == []
    submit_job(c, entry, tmp_path, timeout=900)
