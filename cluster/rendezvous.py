"""Where the DDP workers meet and talk: the interface gloo and NCCL use, and the rendezvous.

Gloo (and NCCL's bootstrap) pick the interface of the machine's hostname. On one machine that
would accept connections from the network; across machines it often breaks, since many hosts map
their hostname to a loopback address (Debian's 127.0.1.1): each rank then tells its peers to call
it on 127.0.x.x. So:

- on a cluster of this machine alone (``cluster_is_local``), :class:`LoopbackTorchConfig`
  rendezvouses through a file (torch's FileStore) and pins gloo/NCCL to the loopback interface:
  nothing listens beyond loopback;
- on a multi-machine cluster, :class:`NodeInterfaceTorchConfig` keeps Ray Train's TCP rendezvous
  and pins each worker to the interface holding its Ray node's address (the cluster network)
  unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` are set (cluster/README.md).
"""
from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass

from ray.train.torch import TorchConfig

from cluster.ray_private import TorchBackend, set_torch_distributed_env_vars, setup_torch_process_group


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


def _pin_to_node_interface() -> None:
    """In a worker: gloo/NCCL on the interface of this Ray node's address, unless the user chose one."""
    import psutil
    import ray

    ip = ray.util.get_node_ip_address()
    interface = next((name for name, addresses in psutil.net_if_addrs().items()
                      if any(a.address == ip for a in addresses)), None)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackBackend


class _LoopbackBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        store = os.path.join(tempfile.gettempdir(), f"dard-rendezvous-{uuid.uuid4().hex}")
        worker_group.execute(_pin_to_loopback, interface=loopback_interface())
        worker_group.execute(set_torch_distributed_env_vars)
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) else "gloo")
        futures = [worker_group.execute_single_async(i, setup_torch_process_group, backend=backend, world_rank=i,
                                                     world_size=len(worker_group), init_method=f"file://{store}",
                                                     timeout_s=backend_config.timeout_s)
                   for i in range(len(worker_group))]
        import ray

        ray.get(futures)


@dataclass
class NodeInterfaceTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _NodeInterfaceBackend


class _NodeInterfaceBackend(TorchBackend):
    def on_start(self, worker_group, backend_config: NodeInterfaceTorchConfig) -> None:
        worker_group.execute(_pin_to_node_interface)
        super().on_start(worker_group, backend_config)


def cluster_is_local() -> bool:
    """Every live node of the connected Ray cluster is this machine's loopback address."""
    import ray

    return all(n["NodeManagerAddress"] in ("127.0.0.1", "localhost") for n in ray.nodes() if n.get("Alive"))
