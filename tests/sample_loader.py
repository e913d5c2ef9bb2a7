"""Load a samples/ module by file name (as its own module, so factories and tokenizers sit together)."""
import importlib.util
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def load_sample(name: str):
    spec = importlib.util.spec_from_file_location(f"sample_{name}", SAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
