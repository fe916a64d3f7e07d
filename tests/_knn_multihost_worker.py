"""One process of the multi-host neighbour-search test (see tests/test_knn_search.py).

    python tests/_knn_multihost_worker.py PORT PROCESS_ID NUM_PROCESSES

Each process owns 2 simulated CPU devices; ``jax.distributed`` joins them on 127.0.0.1:PORT. The
references are a global array whose rows are split over all 4 devices (2 per process), built with
``jax.make_array_from_process_local_data`` from each process's half. ``kljax.knn.neighbors`` and
``kljax.knn.kl`` must return exactly what NumPy brute force (and the single-process search) gives.
Prints "OK" and exits 0 on success.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402


def main(port: int, process_id: int, num_processes: int) -> None:
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60)
    from kljax import knn

    devices = jax.devices()
    assert len(devices) == 2 * num_processes, devices
    mesh = Mesh(np.array(devices), ("shards",))
    rng = np.random.default_rng(0)  # the same global data on every process
    refs = rng.normal(size=(64, 3))
    queries = rng.normal(size=(10, 3))
    rows = refs.shape[0] // num_processes
    local = refs[process_id * rows:(process_id + 1) * rows]
    global_refs = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("shards")),
                                                         local, refs.shape)
    assert not global_refs.is_fully_addressable

    distances = np.linalg.norm(queries[:, None, :] - refs[None, :, :], axis=-1)
    expected_index = np.argsort(distances, axis=1, kind="stable")[:, :4]
    expected_distance = np.take_along_axis(distances, expected_index, axis=1)
    for method in ("brute", "kdtree"):
        got_distance, got_index = knn.neighbors(queries, global_refs, 4, method=method)
        np.testing.assert_array_equal(np.asarray(got_index), expected_index)
        np.testing.assert_allclose(np.asarray(got_distance), expected_distance, rtol=1e-12)

    x = rng.normal(size=(40, 3))
    single = float(knn.kl(x, refs, estimator="wkv", method="brute"))
    sharded = float(knn.kl(x, global_refs, estimator="wkv", method="brute"))
    assert sharded == single, (sharded, single)
    print("OK", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
