"""DDP rendezvous for a Ray cluster on this machine alone: nothing listens beyond loopback.

Ray Train's default rendezvous is torch's TCP store, which binds every interface of rank 0's
machine, and gloo binds the interface of the machine's hostname: a local ``dard train`` would
accept connections from the network. On a local cluster this backend rendezvouses through a file
(torch's FileStore) and pins gloo to the loopback interface. Multi-machine clusters keep Ray's
default: there the cluster network is needed (cluster/README.md, "Network exposure").
"""
from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def _pin_to_loopback(interface: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface


@dataclass
class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackBackend


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        store = os.path.join(tempfile.gettempdir(), f"dard-rendezvous-{uuid.uuid4().hex}")
        worker_group.execute(_pin_to_loopback, interface=loopback_interface())
        worker_group.execute(_set_torch_distributed_env_vars)
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo")
        futures = [worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                     world_size=len(worker_group), init_method=f"file://{store}",
                                                     timeout_s=backend_config.timeout_s)
                   for i in range(len(worker_group))]
        import ray

        ray.get(futures)


def cluster_is_local() -> bool:
    """Every live node of the connected Ray cluster is this machine's loopback address."""
    import ray

    return all(n["NodeManagerAddress"] in ("127.0.0.1", "localhost") for n in ray.nodes() if n.get("Alive"))
