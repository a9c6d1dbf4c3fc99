"""Shared by the tests of the offline compile scripts in benchmarks/ (ptxas_report.py, compile_check.py): whether
triton's bundled NVIDIA tools are there, and importing such a script as a module."""
import importlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvidia_tools_available(*tools: str) -> bool:
    """Whether triton is installed with its bundled ``tools`` (backends/nvidia/bin: ptxas, cuobjdump)."""
    try:
        import triton
    except ImportError:
        return False
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in tools)


def import_bench_script(monkeypatch, name: str):
    """``benchmarks/<name>.py`` imported as a module. Such a script drops TRITON_INTERPRET at import (it
    compiles for the GPU): ``monkeypatch`` restores the variable after the test."""
    if "TRITON_INTERPRET" in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module(name)
