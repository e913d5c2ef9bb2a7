"""Read a NumPy .npz archive safely: never pickles, and a file that is not one is named as such."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import MoeccError


def load_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """{name: array} of the archive at `path`; one clear MoeccError line (prefixed `what`) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MoeccError(f"{what}: {path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise MoeccError(f"{what}: {path} is not an .npz archive (not a zip file); write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MoeccError(f"{what}: {path} is a damaged or unsupported .npz archive ({first})") from None
