"""What a real local Ray instance started by gan-pipeline exposes: sockets, its auth token file, its logs.

One ``ray_session`` (the product's only way to start Ray) with secrets in the environment; a remote task proves
the secrets reach the workers; then, while a Ray Train run (controller and two gloo workers) is up, every listening
TCP socket of the process tree is listed from ``/proc``, and every file of Ray's session is searched for the
secrets.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

SECRET = "ray-exposure-Secret-9d2f"


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (local address, port) of every listening TCP socket on the machine (IPv4 and IPv6)."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # LISTEN
                continue
            host_hex, port_hex = local.split(":")
            if width == 8:
                host = ".".join(str(b) for b in reversed(bytes.fromhex(host_hex)))
            else:
                words = [bytes.fromhex(host_hex[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
                host = ":".join(w[i:i + 4] for w in words for i in (0, 4))
            out[inode] = (host, int(port_hex, 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _hold(config: dict) -> None:
    """A Ray Train worker that says it is up, then waits for the test to have listed the sockets."""
    import time

    Path(config["started"]).touch()
    deadline = time.monotonic() + 120
    while not Path(config["release"]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:60]
    except OSError:
        return "?"


def _sockets_of_this_process_tree() -> dict[tuple[str, int], set[int]]:
    sockets = _listening_sockets()
    bound: dict[tuple[str, int], set[int]] = {}
    for pid in _descendants(os.getpid()) | {os.getpid()}:
        for inode in _socket_inodes(pid):
            if inode in sockets:
                bound.setdefault(sockets[inode], set()).add(pid)
    return bound


LOOPBACK = {"127.0.0.1", "0000:0000:0000:0000:0000:0000:0000:0001", "0000:0000:0000:0000:0000:ffff:7f00:0001"}
WILDCARD = {"0.0.0.0", "0000:0000:0000:0000:0000:0000:0000:0000"}


@pytest.mark.integration
def test_local_ray_listens_on_loopback_and_keeps_secrets_out_of_logs(tmp_path, monkeypatch):
    import ray

    from pipelines.cluster import ray_session

    monkeypatch.setenv("GAN_PIPELINE_STATE_DIR", str(tmp_path / "state"))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    with ray_session(None, cpus_needed=2, env={"MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}):
        seen = ray.get(ray.remote(lambda: os.environ.get("MLFLOW_TRACKING_PASSWORD")).remote())
        # Ray's own actors find this instance by RAY_ADDRESS, not by scanning the machine for "the" instance
        own_address = ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote())
        assert own_address == ray.get_runtime_context().gcs_address, own_address
        # a real Ray Train run (controller + 2 workers, gloo) is up while the sockets are listed
        import threading
        import time

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        flags = {"started": str(tmp_path / "started"), "release": str(tmp_path / "release")}
        trainer = TorchTrainer(_hold, train_loop_config=flags, scaling_config=ScalingConfig(num_workers=2),
                               run_config=RunConfig(name="exposure", storage_path=str(tmp_path / "storage")))
        fitting = threading.Thread(target=trainer.fit, daemon=True)
        fitting.start()
        deadline = time.monotonic() + 180
        while not Path(flags["started"]).exists():
            assert time.monotonic() < deadline and fitting.is_alive(), "the training run did not start"
            time.sleep(0.5)
        bound = _sockets_of_this_process_tree()
        names = {pid: _cmdline(pid) for pids in bound.values() for pid in pids}
        Path(flags["release"]).touch()
        fitting.join(timeout=120)
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        assert os.environ.get("RAY_AUTH_MODE") == "token"
        token_mode = stat.S_IMODE(token.stat().st_mode)
        leaked = [str(p) for p in session.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert seen == SECRET, "the secret did not reach the workers"
    assert token_mode == 0o600, oct(token_mode)
    assert bound, "no listening socket found: the /proc listing is broken"
    beyond = {addr: sorted(names[pid] for pid in pids) for addr, pids in bound.items() if addr[0] not in LOOPBACK}
    # The one exception (docs/reliability.md, Security): PyTorch's process-group rendezvous store
    # (TCPStore) of rank 0, which torch binds to the wildcard (it has no bind-address option), while a run lasts.
    rendezvous = {addr: who for addr, who in beyond.items() if addr[0] in WILDCARD and who == ["ray::RayTrainWorker"]}
    assert beyond == rendezvous and len(rendezvous) <= 1, f"listening beyond loopback: {beyond}"
    assert not any(addr[0] not in LOOPBACK | WILDCARD for addr in bound), "a socket on the machine's address"
    assert len(bound) >= 8, sorted(bound)  # GCS, raylet, dashboard, its agent, runtime-env agent, Train actors
    assert not leaked, f"secret written to Ray's logs: {leaked}"
    print("listening:", sorted(bound))
