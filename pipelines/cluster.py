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
                env: Optional[dict[str, str]] = None, declare_cpus: Optional[int] = None) -> Iterator[None]:
    """Start (and cleanly stop) a local Ray instance, or join ``address``; check up front that the work fits.

    ``cpus_needed``: what one unit of work (a training run, a Tune trial) needs; ``declare_cpus``: what the local
    instance should offer in all (several concurrent trials). Locally, logical CPUs are declared as
    ``max(cores, cpus_needed, declare_cpus)``: a worker's CPU is a scheduling token,
    the real thread count is set per worker (``torch.set_num_threads``), so 4 workers on 2 cores share them
    instead of waiting forever for CPUs that do not exist.
    """
    import ray

    if ray.is_initialized():  # inside a Tune trial or a caller's session: theirs to manage
        yield
        return
    # Ray Train's print patch would echo every progress line twice (stdout and its logger).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    runtime_env = {"env_vars": dict(env or {})}
    quiet = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        _probe(address)
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
        # The dashboard binds 127.0.0.1 unless told otherwise; Ray Train's state API needs it.
        # address="local": always a fresh instance, never a cluster that `ray start` left on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed, declare_cpus or 0), num_gpus=gpus, runtime_env=runtime_env,
                 dashboard_host="127.0.0.1", **quiet)
    try:
        _check_fits(cpus_needed, gpus_needed, address)
        yield
    finally:
        ray.shutdown()


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
