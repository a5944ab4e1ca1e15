"""Hermetic test session: every cache and config directory points into a temp folder,
hubs are offline, and the demo catalog of tiny artifacts is written once per session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="modelkit-tests-"))
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": str(_HOME / "hf"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(_HOME / "wandb"),
    "WANDB_CACHE_DIR": str(_HOME / "wandb-cache"),
    "WANDB_DATA_DIR": str(_HOME / "wandb-data"),
    "WANDB_ARTIFACT_DIR": str(_HOME / "wandb-artifacts"),
    "WANDB_CONFIG_DIR": str(_HOME / "wandb-config"),
    "MODELKIT_CACHE": str(_HOME / "modelkit-cache"),
    "JUPYTER_CONFIG_DIR": str(_HOME / "jupyter-config"),
    "JUPYTER_DATA_DIR": str(_HOME / "jupyter-data"),
    "JUPYTER_RUNTIME_DIR": str(_HOME / "jupyter-runtime"),
    "JUPYTER_PLATFORM_DIRS": "1",
    "IPYTHONDIR": str(_HOME / "ipython"),
    "MPLCONFIGDIR": str(_HOME / "mpl"),
    "MPLBACKEND": "Agg",
    "TOKENIZERS_PARALLELISM": "false",
    "XDG_CACHE_HOME": str(_HOME / "xdg-cache"),
}
for _k, _v in _ENV.items():
    os.environ[_k] = _v
for _k in ("HF_HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
           "WANDB_CONFIG_DIR", "MODELKIT_CACHE", "IPYTHONDIR", "MPLCONFIGDIR"):
    Path(os.environ[_k]).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def catalog(tmp_path_factory) -> dict[str, Path]:
    """One tiny artifact of every layout and fault (see modelkit.testing.write_catalog)."""
    from modelkit.testing import write_catalog

    return write_catalog(tmp_path_factory.mktemp("catalog"))


# Tiny models on a 2-core machine: one thread avoids oversubscription (15 ms vs 5 us
# for a tiny matmul under load).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory) -> dict[str, Path]:
    """The demo base model and its LoRA fine-tune (see modelkit.ui.demo_pair)."""
    from modelkit.ui.demo_pair import write_demo_pair

    return write_demo_pair(tmp_path_factory.mktemp("demo-pair"))


@pytest.fixture(scope="session")
def training_run(demo_pair, tmp_path_factory) -> Path:
    """The simulated training run of modelkit.testing.training_run, already written."""
    from modelkit.testing.training_run import write_run

    run = tmp_path_factory.mktemp("runs") / "run"
    write_run(run, demo_pair["base"], demo_pair["trained"])
    return run
