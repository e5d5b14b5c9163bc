"""The one bounded folder walk of `tunesmith ui`: every page that lists files or runs under `--root`
(runs table, New run's data files, label review's runs) searches the tree through `walk`, so each
has the same limits, skips the same folders and never leaves the root through a symlink."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

UI_DIR = ".tunesmith-ui"  # the workbench's own folder under --root (drafts, configs, jobs, corrections)
# Folders no scan enters (besides hidden ones, which hold the workbench's own files, staging and VCS data).
SKIPPED = frozenset({"node_modules", "__pycache__", "site-packages", "__pypackages__"})


def walk(root: Path, max_depth: int, max_entries: int, follow_inside_symlinks: bool = False,
         enter: Callable[[Path], bool] | None = None) -> Iterator[tuple[Path, os.DirEntry, int]]:
    """(path, entry, depth) of the entries below `root`, breadth first; depth 1 is `root`'s own entries.

    Limits: at most `max_entries` directory entries are read in all (a folder holding millions of
    files costs `max_entries` reads, never a full listing: each folder's entries are read up to what
    is left of the budget, then sorted by name), and folders are entered down to depth `max_depth`.
    Skipped, neither yielded nor entered: names starting with "." and the folders in SKIPPED.
    Symlinks: with `follow_inside_symlinks` False none are yielded or followed; with it True, a
    symlink is yielded (and entered, once per target) only when its target resolves inside `root`.
    A yielded folder is entered unless `enter(path)` returns False; `enter` runs when the walk
    resumes after yielding that folder, so the caller can decide from what it saw (a run directory
    is not searched further)."""
    root = Path(root).resolve()
    queue, budget, entered = deque([(root, 0)]), max_entries, {root}
    while queue and budget > 0:
        folder, depth = queue.popleft()
        try:
            with os.scandir(folder) as it:
                entries = sorted(itertools.islice(it, budget), key=lambda e: e.name)
        except OSError:
            continue
        budget -= len(entries)
        for entry in entries:
            path = _followed(root, entry, follow_inside_symlinks)
            if path is None:
                continue
            is_dir = _is_dir(entry)
            if is_dir and entry.name in SKIPPED:
                continue
            yield Path(entry.path), entry, depth + 1
            if is_dir and depth + 1 < max_depth and path not in entered and (enter is None or enter(Path(entry.path))):
                entered.add(path)
                queue.append((Path(entry.path), depth + 1))


def _followed(root: Path, entry: os.DirEntry, follow: bool) -> Path | None:
    """Where `entry` leads (its resolved path), or None when it is hidden or a symlink the walk ignores."""
    if entry.name.startswith("."):
        return None
    try:
        if not entry.is_symlink():
            return Path(entry.path)
        if not follow:
            return None
        target = Path(entry.path).resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, a loop
        return None
    return target if target.is_relative_to(root) else None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
