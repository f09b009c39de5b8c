"""The channel for errors a restart would only repeat (config, shards, a resume under another
config, a NaN loss, a shard part that cannot be read): an actor on the driver's node that holds the
first such message. Raised in a worker, such an error would make Ray Train restart the group
``max_failures`` times to fail the same way; the workers put it here and end instead, and
:func:`cluster.train.train_distributed` raises it on the driver (Ray Train has no per-error retry
policy for worker errors)."""
from __future__ import annotations

from dard.logs import one_line


class FatalError:
    """The actor: keeps the first message any rank sets."""

    def __init__(self):
        self.message: str | None = None

    def set(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str | None:
        return self.message


def fatal_channel(ray):
    """A :class:`FatalError` actor pinned to the driver's node: an actor elsewhere would die with its
    host (a lost worker host must not take the run's error channel with it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(FatalError).options(scheduling_strategy=here).remote()


def stop_everywhere(error: BaseException | None, world: int, rank: int, fatal) -> bool:
    """Whether any rank hit such an error (a collective: every rank calls it, so all end together)."""
    import ray

    messages = [one_line(error) if error is not None else None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(messages, messages[0])
    first = next((m for m in messages if m is not None), None)
    if first is not None and rank == 0:
        ray.get(fatal.set.remote(first))
    return first is not None
