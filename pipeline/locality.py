"""Where a job's data lives versus where its workers run.

The driver resolves every URI to an absolute URI with a scheme before anything reaches a
worker, so no worker ever resolves a path against its own working directory. A node-local
path (relative, absolute or ``file://``) for input or output is refused on a cluster of
several nodes, unless the job declares ``storage.shared_filesystem`` (NFS, FSx, GCS FUSE);
on a single node the workers are pinned to the driver's node, so a cluster that grows later
never sends a shard to a node that cannot see the files. A model bundle on a node-local path
is shipped to the workers by the driver instead (``pipeline.models.shipping``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.spec import JobSpec


def is_node_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith(("file://", "local://"))


def resolve_uri(uri: str) -> str:
    """An absolute URI with a scheme: ``data/x`` -> ``file:///abs/data/x``; remote URIs as is."""
    if not is_node_local(uri):
        return uri
    path = uri.split("://", 1)[1] if "://" in uri else uri
    trailing = "/" if path.endswith("/") and len(path) > 1 else ""
    return "file://" + os.path.abspath(os.path.expanduser(path)) + trailing


def resolve_spec(spec: JobSpec) -> JobSpec:
    """The spec with input, output and model URIs resolved on this (the driver's) machine."""
    return spec.model_copy(update={
        "input": spec.input.model_copy(update={
            "uri": resolve_uri(spec.input.uri) if spec.input.uri is not None else None}),
        "output": spec.output.model_copy(update={
            "uri": resolve_uri(spec.output.uri),
            # A Delta or Lance table to merge into is a location; an Iceberg table a name.
            "table": resolve_uri(spec.output.table) if spec.output.table
            and spec.output.format != "iceberg" else spec.output.table}),
        "model": spec.model.model_copy(update={"uri": resolve_uri(spec.model.uri)}),
    })


@dataclass(frozen=True)
class ClusterView:
    nodes: int  # alive nodes
    driver_node: str | None  # node id of the driver, None when it is not on a cluster node
    remote_driver: bool = False  # Ray Client: the driver's disk is on no cluster node


@dataclass(frozen=True)
class Placement:
    pin_node: str | None = None  # workers must run on this node (node-local data)


def ships_model(spec: JobSpec) -> bool:
    """A bundle on a node-local path goes to the workers through the object store."""
    return is_node_local(spec.model.uri) and not spec.storage.shared_filesystem


def check_placement(spec: JobSpec, cluster: ClusterView) -> Placement:
    """Refuse node-local data that workers on other nodes could not see (exit 2)."""
    shared = spec.storage.shared_filesystem
    local = [(key, uri) for key, uri in (("input.uri", spec.input.uri),
                                          ("output.uri", spec.output.uri))
             if uri is not None and is_node_local(uri)]
    if not local or shared:
        return Placement(None)
    key, uri = local[0]
    if cluster.nodes > 1 or cluster.remote_driver or cluster.driver_node is None:
        where = (f"the Ray cluster has {cluster.nodes} nodes" if cluster.nodes > 1
                 else "the driver is not on a cluster node")
        raise ConfigError(
            f"{key}: {uri} is a path on this machine, but {where}; workers elsewhere would not "
            "see it. Use object storage (s3://, gs://, ...) or, if every node mounts it at the "
            "same path, set storage.shared_filesystem: true")
    return Placement(cluster.driver_node)
