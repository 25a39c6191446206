"""himac's cache directory and the one way things are written into it.

It lives with the environments, the bottom layer, because both an env (ALFWorld
unpacks its game tarballs here) and the model loader (materialised models) use it.
Torch-free on purpose: env worker processes use it too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    return Path(os.environ.get("HIMAC_CACHE", Path.home() / ".cache" / "himac"))


def atomic_dir(target: Path, write: Callable[[Path], None], marker: str) -> Path:
    """Run write(tmpdir) and move the result to `target`, once.

    `target/marker` is the proof of a finished write: a crash leaves no half
    directory that counts, and when two processes race, the first to finish wins.
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    try:
        write(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"writing {target} did not produce {marker}")
        if (target / marker).is_file():  # another process won the race
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
