"""URIs resolved on the driver, and node-local data against the shape of the cluster."""

from __future__ import annotations

import os

import pytest

from pipeline.errors import ConfigError
from pipeline.job_file import load_spec
from pipeline.locality import (
    ClusterView,
    check_placement,
    is_node_local,
    resolve_spec,
    resolve_uri,
    ships_model,
)


def spec(input_uri="s3://b/in", output_uri="s3://b/out", model_uri="s3://b/model", shared=False):
    return load_spec({"input": {"uri": input_uri}, "model": {"uri": model_uri},
                      "task": {"kind": "embed"}, "output": {"uri": output_uri},
                      "storage": {"shared_filesystem": shared}})


def test_local_paths_become_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("data/text") == f"file://{tmp_path}/data/text"
    assert resolve_uri("data/*.parquet") == f"file://{tmp_path}/data/*.parquet"
    assert resolve_uri("./out/") == f"file://{tmp_path}/out/"
    assert resolve_uri("/abs/x") == "file:///abs/x"
    assert resolve_uri("file:///abs/x") == "file:///abs/x"
    assert resolve_uri("~/x") == f"file://{os.path.expanduser('~')}/x"
    for remote in ("s3://bucket/key", "gs://b/k", "abfs://c/p"):
        assert resolve_uri(remote) == remote and not is_node_local(remote)


def test_resolve_spec_resolves_input_output_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_spec(spec("in", "out", "models/m"))
    assert resolved.input.uri == f"file://{tmp_path}/in"
    assert resolved.output.uri == f"file://{tmp_path}/out"
    assert resolved.model.uri == f"file://{tmp_path}/models/m"


ONE_NODE = ClusterView(nodes=1, driver_node="n1")
TWO_NODES = ClusterView(nodes=2, driver_node="n1")


def test_object_storage_runs_anywhere():
    assert check_placement(spec(), TWO_NODES).pin_node is None
    assert not ships_model(spec())


@pytest.mark.parametrize("key", ["input.uri", "output.uri"])
def test_node_local_data_is_refused_on_several_nodes_naming_the_key(key):
    uris = {"input_uri": "s3://b/in", "output_uri": "s3://b/out"}
    uris[key.replace(".", "_")] = "file:///data/x"
    with pytest.raises(ConfigError) as err:
        check_placement(spec(**uris), TWO_NODES)
    message = str(err.value)
    assert message.startswith(f"{key}: file:///data/x is a path on this machine")
    assert "2 nodes" in message and "storage.shared_filesystem: true" in message
    assert "\n" not in message


def test_node_local_data_on_one_node_pins_workers_to_it():
    placement = check_placement(spec("file:///in", "file:///out"), ONE_NODE)
    assert placement.pin_node == "n1"


def test_shared_filesystem_lifts_the_check():
    placement = check_placement(spec("file:///nfs/in", "file:///nfs/out", shared=True), TWO_NODES)
    assert placement.pin_node is None


def test_a_remote_driver_cannot_use_its_own_disk():
    with pytest.raises(ConfigError, match="the driver is not on a cluster node"):
        check_placement(spec("file:///in"), ClusterView(1, None, remote_driver=True))


def test_a_local_model_is_shipped_unless_storage_is_shared():
    assert ships_model(spec(model_uri="file:///models/m"))
    assert not ships_model(spec(model_uri="file:///models/m", shared=True))
    # A local model alone never pins the workers: it travels with the job.
    assert check_placement(spec(model_uri="file:///models/m"), TWO_NODES).pin_node is None
