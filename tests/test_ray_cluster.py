"""--search_backend ray on a two-node cluster (two raylets on this machine, `ray.cluster_utils.Cluster`): each shard
actor lands on the node that carries its `knnlm_shard_<s>` resource, and the ids and distances are those of
one-process IndexShards. A module of its own: it needs its own Ray (test_ray_search.py holds a one-node one)."""
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from knnlm.index import IndexArgs, build_index, load_index  # noqa: E402
from knnlm.knn import KNNArgs  # noqa: E402
from knnlm.ray_search import RayBackend  # noqa: E402
from knnlm.search import IndexBackend, make_backend  # noqa: E402
from test_index import make_store  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Head: 1 CPU and shard 1's resource; a second node: 1 CPU and shard 0's (so placement by CPU alone, which fills
    the head first, would put shard 0 on the wrong node)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"knnlm_shard_1": 1},
                                                       "include_dashboard": False})
    worker = c.add_node(num_cpus=1, resources={"knnlm_shard_0": 1})
    ray.init(address=c.address, namespace="knnlm", log_to_driver=False)
    c.wait_for_nodes()
    yield c, worker
    ray.shutdown()
    c.shutdown()
    time.sleep(0.5)


def test_shards_placed_by_resource_on_two_nodes(cluster, tmp_path):
    c, worker = cluster
    ds = make_store(tmp_path / "s")
    build_index(ds, IndexArgs(factory="Flat", shards=2))
    args = KNNArgs(search_backend="ray", ray_address=c.address, ray_shard_cpus=0.5)
    args.validate()
    backend = make_backend(ds, args)
    try:
        assert isinstance(backend, RayBackend)
        nodes = [ray.get(a.describe.remote())["node_id"] for a in backend.actors]
        assert nodes[0] == worker.node_id and nodes[1] == c.head_node.node_id and nodes[0] != nodes[1]
        q = torch.from_numpy(np.asarray(ds.keys[::300], dtype=np.float32) + 0.05)  # [14, d]
        dists, ids = backend.search(q, 40)
        ref_d, ref_i = IndexBackend(load_index(ds.dir, use_gpu=False), ds).search(q, 40)
        assert torch.equal(ids, ref_i) and torch.equal(dists, ref_d)
        assert (ids < 2000).any() and (ids >= 2000).any()  # both nodes' shards answered
    finally:
        backend.close()
