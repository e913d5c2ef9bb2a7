"""A progress bar over the named steps of a long job (tqdm, on stderr)."""
from __future__ import annotations

import sys


class Steps:
    def __init__(self, names: list[str], enabled: bool = True):
        self.names = names
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=len(names), desc=names[0], unit="step", leave=False, file=sys.stderr)
        self.done = 0

    def next(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description(name)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.update(len(self.names) - self.bar.n)
            self.bar.close()
