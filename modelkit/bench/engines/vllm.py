"""lm-eval's ``vllm`` backend: the model arguments for tensor and data parallel runs.

vLLM does the scheduling across GPUs itself (``tensor_parallel_size`` splits each layer,
``data_parallel_size`` runs replicas); modelkit only passes the sizes through. vLLM
needs a GPU, so on a CPU machine only the command is built (and tested).
"""
from __future__ import annotations

from typing import Any

from modelkit.errors import CompareError


def vllm_model_args(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                    gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """``--model_args`` entries of lm-eval's vllm backend for the parallel sizes."""
    args: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size,
                            "data_parallel_size": data_parallel_size}
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise CompareError("gpu_memory_utilization must be in (0, 1]")
        args["gpu_memory_utilization"] = gpu_memory_utilization
    return args


def require_vllm() -> None:
    """CompareError when vLLM is not importable here (it needs a GPU machine)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise CompareError("the vllm backend needs vLLM, which is not installed in this environment "
                           "(pip install vllm, on a GPU machine); `modelkit compare --engine lm-eval "
                           "--backend vllm --print-commands` prints the commands to run there")
