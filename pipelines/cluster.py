"""Ray: a local instance sized so nested work cannot starve, or an existing cluster (``--address``)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from pipelines import cluster_auth
from pipelines.errors import UserError


class ClusterError(UserError):
    pass


@contextlib.contextmanager
def ray_session(address: Optional[str], cpus_needed: int, gpus_needed: int = 0,
                env: Optional[dict[str, str]] = None, declare_cpus: Optional[int] = None,
                worker_output: bool = True, lean: bool = False,
                resources: Optional[dict[str, float]] = None) -> Iterator[None]:
    """Start (and cleanly stop) a local Ray instance, or join ``address``; check up front that the work fits.

    ``cpus_needed``: what one unit of work (a training run, a Tune trial) needs; ``declare_cpus``: what the local
    instance should offer in all (several concurrent trials). Locally, logical CPUs are declared as
    ``max(cores, cpus_needed, declare_cpus)``: a worker's CPU is a scheduling token,
    the real thread count is set per worker (``torch.set_num_threads``), so 4 workers on 2 cores share them
    instead of waiting forever for CPUs that do not exist.

    ``worker_output``: Ray relays every worker's and Ray process's output to this console, prefixed (Tune: the
    trials' lines come that way). ``train`` turns it off: its progress comes through ``pipelines.progress``, a
    failure as the exception ``fit`` raises, and the rest stays in Ray's session logs. Ray's own driver-side log
    lines go to the product's log file either way (errors still to the console).

    ``resources``: custom resources a local instance declares (``tune``'s trial slots); not for a cluster.

    ``lean`` (a local instance only; ``--address`` clusters are as their owner set them up): only the services a
    local training run needs, see ``LEAN_LOCAL_ENV``: faster to start, and less of the machine taken while training.
    """
    import ray

    _ray_logs_to_file()

    if ray.is_initialized():  # inside a Tune trial or a caller's session: theirs to manage
        yield
        return
    # Ray Train's print patch would echo every progress line twice (stdout and its logger).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    quiet = {"log_to_driver": worker_output, "configure_logging": True, "logging_level": "INFO"}
    if address:
        _probe(address)
        # a remote cluster's workers do not share this process's environment: runtime_env is the only way there
        # (Ray's runtime-env agent on the cluster logs it; see docs/reliability.md, Security)
        runtime_env = {"env_vars": dict(env or {})}
        cluster_auth.use_user_token()
        try:
            ray.init(address=address, runtime_env=runtime_env, **quiet)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
            raise ClusterError(cluster_auth.join_failure(address, exc)) from None
    else:
        gpus = None
        if gpus_needed:
            import torch

            gpus = torch.cuda.device_count()
        # The dashboard binds 127.0.0.1 unless told otherwise (a lean instance has none).
        # address="local": always a fresh instance, never a cluster that `ray start` left on this machine.
        # Local workers inherit this process's environment (raylet and workers are its children), so secrets
        # reach them without runtime_env, whose env_vars Ray writes in clear text to its session logs.
        restore = inherited_env({**(env or {}), **local_auth_env(), **LOOPBACK_ENV, **_own_address_env(),
                                 **(LEAN_LOCAL_ENV if lean else {})})
        restore_constant = _loopback_node_address()
        try:
            # every address Ray lets us choose on loopback (its gRPC servers still bind the wildcard, guarded by
            # the token; docs/reliability.md, Security)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed, declare_cpus or 0),
                     num_gpus=gpus, resources=resources, include_dashboard=not lean, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", **quiet)
        except BaseException:
            restore()
            restore_constant()
            raise
    try:
        _check_fits(cpus_needed, gpus_needed, address)
        yield
    finally:
        ray.shutdown()
        if not address:
            restore()
            restore_constant()


# What a lean local instance goes without, and what that loses (README, "Measured"):
#   include_dashboard=False                 the dashboard's web server and its modules (a Python process with a
#                                           poll loop): no Ray dashboard for a local run (MLflow is the product's UI)
#   RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0   Train's actor that polls for node drains every 5 s: nothing to drain on
#                                           one machine (and its error-level line at every start is gone)
#   RAY_TRAIN_METRICS_ENABLED=0,            Train's and Ray's Prometheus metrics export (nothing scrapes a local
#   RAY_enable_metrics_collection=0         instance); MLflow holds the run's metrics and system metrics
#   RAY_USAGE_STATS_ENABLED=0               Ray's usage-stats report (it is off offline anyway)
LEAN_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                  "RAY_enable_metrics_collection": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_logs_to_file() -> None:
    """Ray's driver-side log lines (``Started a local Ray instance``, the token-auth notice, ...) go to the product's
    log file; only errors stay on the console."""
    import logging

    from pipelines.guard import library_log_handler

    ray_logger = logging.getLogger("ray")
    file_handler = library_log_handler()
    for handler in ray_logger.handlers:
        if handler is not file_handler:
            handler.setLevel(max(handler.level, logging.ERROR))
    if file_handler not in ray_logger.handlers:
        ray_logger.addHandler(file_handler)


def inherited_env(env: dict[str, str]):
    """Put ``env`` into this process's environment (for the local Ray processes to inherit); returns the undo."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)

    def restore() -> None:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


# Ray resolves a node address of 127.0.0.1 back to the machine's external address unless it runs as a single-machine
# instance (its Windows/macOS default, ray_constants.ENABLE_RAY_CLUSTER false): then the node address, which the
# runtime-env agent, the dashboard agent and every "where am I" lookup use, is 127.0.0.1. The variable covers the
# child processes; the constant, read at import, the driver.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _loopback_node_address():
    import ray._private.ray_constants as ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        ray_constants.ENABLE_RAY_CLUSTER = before

    return restore


def _own_address_env() -> dict[str, str]:
    """The instance's GCS port, chosen here, and ``RAY_ADDRESS`` pointing at it for every process of the instance:
    Ray's internal actors (Train's PlacementGroupCleaner, the state API) otherwise look for "the" local instance and,
    beside another one on the machine, print "Found multiple active Ray instances" and a traceback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}


def local_auth_env() -> dict[str, str]:
    """Ray token authentication, on, with a token file only the user can read (Ray's own ``~/.ray/auth_token`` is
    created 0644). A token configured by the user (``RAY_AUTH_*``) is theirs and left alone."""
    if any(key in os.environ for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return {}
    import secrets

    from pipelines.guard import state_dir

    path = state_dir() / "ray_auth_token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    except FileExistsError:
        os.chmod(path, 0o600)  # the product's own file: kept private even if someone loosened it
    # RAY_AUTH_MODE stays unset: a new local instance then turns token mode on itself (Ray 2.60's default, which
    # also refreshes Ray's cached config; setting the variable here would come too late for that cache)
    return {"RAY_AUTH_TOKEN_PATH": str(path)}


def _probe(address: str, timeout: float = 5.0) -> None:
    """A dead ``host:port`` / ``ray://host:port`` fails in seconds: ray.init itself retries the GCS for
    minutes. ``auto`` is left to ray.init (it reads the local cluster's address file and fails fast)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address!r}: nothing answers at {hostport} "
                           f"({exc.strerror or exc}). Is `ray start --head` running there, and is the address right "
                           f"(auto, host:6379, ray://host:10001)?") from None


def _check_fits(cpus_needed: int, gpus_needed: int, address: Optional[str]) -> None:
    """Asking for more than the cluster can ever give is an error now, not a hang later."""
    import ray

    total = ray.cluster_resources()
    where = f"the Ray cluster at {address}" if address else "this machine's local Ray instance"
    if gpus_needed > total.get("GPU", 0):
        raise ClusterError(f"the run needs {gpus_needed} GPU(s) but {where} has {int(total.get('GPU', 0))}; "
                           f"drop --gpu or lower --workers")
    if cpus_needed > total.get("CPU", 0) and not _autoscaling():
        raise ClusterError(f"the run needs {cpus_needed} CPUs but {where} has {int(total.get('CPU', 0))}; "
                           f"lower --workers (or --max-concurrent for tune)")


def _autoscaling() -> bool:
    return os.environ.get("GAN_PIPELINE_AUTOSCALING", "") == "1"
