"""The GPU tests share the comparison code of ``tools/gpu_check.py`` (one implementation)."""
import pathlib
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
