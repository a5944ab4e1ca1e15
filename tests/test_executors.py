"""Executors run one evaluation per task and change nothing in the results: a local
process pool, a Ray cluster started here (logical GPUs), and submitit's local executor
give the per-sample results of evaluating one model after another in this process."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from modelkit.ops.compare import compare
from modelkit.bench.executors import LocalPool, RayExecutor, SubmititExecutor, get_executor

TASKS = ["mk_count"]
LIMIT = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from modelkit.ui.demo_pair import write_demo_pair

    return write_demo_pair(tmp_path_factory.mktemp("demo-pair"))


def run(pair, executor=None):
    return compare(pair["base"], pair["trained"], tasks=TASKS, limit=LIMIT, progress=False, use_cache=False,
                   executor=executor)


@pytest.fixture(scope="module")
def here(pair):
    return run(pair)


@pytest.fixture(scope="module")
def pooled(pair):
    return run(pair, LocalPool(max_workers=2))


def same(a, b) -> None:
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    for m in a.models:
        assert a.runs[m.label] == b.runs[m.label]


def test_a_local_process_pool_gives_the_in_process_results(here, pooled):
    same(here, pooled)
    assert all(m.engine["engine"] == "inprocess" for m in pooled.models)


def test_ray_tasks_with_logical_gpus_give_the_local_pool_results(pair, pooled, monkeypatch):
    ray = pytest.importorskip("ray")
    # a loaded 2-core machine starts Ray slowly: wait longer, and start no metrics agent
    for key, value in {"RAY_raylet_start_wait_time_s": "180", "RAY_agent_register_timeout_ms": "180000",
                       "RAY_enable_metrics_collection": "0", "RAY_AUTH_MODE": "disabled"}.items():
        monkeypatch.setenv(key, value)
    temp = Path(tempfile.mkdtemp(prefix="mkray-"))     # short: Ray's socket paths must fit 107 bytes
    for attempt in range(3):   # the raylet gives its agents 15 s to start: under load, try again
        try:
            ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, _temp_dir=str(temp))
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                shutil.rmtree(temp, ignore_errors=True)
                raise
    try:
        executor = RayExecutor(num_gpus=1, num_cpus=1)
        result = run(pair, executor)
        assert ray.cluster_resources().get("GPU") == 2.0            # two logical GPUs, none real
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    same(pooled, result)
    assert len(executor.placements) == 2                             # one task per evaluation
    for placed in executor.placements:
        assert len(placed["gpu_ids"]) == 1 and placed["CUDA_VISIBLE_DEVICES"] == placed["gpu_ids"][0]


def test_submitit_local_executor_gives_the_local_pool_results(pair, pooled, tmp_path):
    result = run(pair, SubmititExecutor(folder=str(tmp_path / "submitit"), cluster="local",
                                        parameters={"timeout_min": 10}))
    same(pooled, result)
    assert list((tmp_path / "submitit").glob("*_result.pkl"))      # each evaluation was a submitit job


def test_executors_by_name():
    assert isinstance(get_executor(), LocalPool)
    assert isinstance(get_executor("ray", num_gpus=0.5), RayExecutor)
    assert get_executor("slurm", folder="logs", parameters={"gpus_per_node": 1}).parameters == {"gpus_per_node": 1}
    from modelkit.errors import CompareError

    with pytest.raises(CompareError, match="unknown executor"):
        get_executor("kubernetes")
