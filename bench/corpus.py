"""Byte-level text that exists on every machine: the running Python's standard-library sources.

The file list rule: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, except those
inside a folder named ``site-packages``, ``dist-packages``, ``test``, ``tests``, ``idlelib``,
``turtledemo``, ``lib2to3`` or ``__pycache__``; sorted by path relative to the stdlib folder.
Each file goes to one split by a hash of its relative path (stable across Python versions for
the files they share): :func:`split_of`. The corpus hash (sha256 over paths and bytes) names the
exact text a result was measured on; different Python versions give different corpora.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus", "split_of", "stdlib_files"]

_EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                               "lib2to3", "__pycache__"})
# Between files, so that no window silently joins two files' text.
_SEPARATOR = b"\x00"


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of the corpus files, in order."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if not _EXCLUDED_FOLDERS & set(relative.parts[:-1]) and path.is_file():
            files.append((relative.as_posix(), path))
    return sorted(files)


def split_of(relative_path: str) -> str:
    """"pretrain" (80%), "finetune" (10%) or "heldout" (10%) by the first byte of sha256(path).
    ``train`` uses pretrain + finetune for training and heldout for validation; ``zo`` pretrains
    on pretrain and fine-tunes on finetune, evaluated on heldout."""
    bucket = hashlib.sha256(relative_path.encode()).digest()[0] % 10
    return "heldout" if bucket == 0 else "finetune" if bucket == 1 else "pretrain"


@dataclass
class Corpus:
    """Byte tokens (uint8) of each split, the files' count and the hash of the whole corpus."""

    splits: dict[str, torch.Tensor]
    files: dict[str, int]
    sha256: str
    source: str

    def tokens(self, *names: str) -> torch.Tensor:
        return torch.cat([self.splits[name] for name in names])


def load_corpus(root: Path | None = None) -> Corpus:
    """Read the corpus (about 11 MB for CPython 3.11) into memory."""
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"no Python sources under {root or sysconfig.get_paths()['stdlib']}: nothing to train on")
    digest = hashlib.sha256()
    parts: dict[str, list[bytes]] = {"pretrain": [], "finetune": [], "heldout": []}
    for relative, path in files:
        data = path.read_bytes()
        digest.update(relative.encode() + _SEPARATOR + len(data).to_bytes(8, "little") + data)
        parts[split_of(relative)].append(data + _SEPARATOR)
    splits = {name: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
              for name, chunks in parts.items()}
    return Corpus(splits=splits, files={name: len(chunks) for name, chunks in parts.items()},
                  sha256=digest.hexdigest(), source=str(root or sysconfig.get_paths()["stdlib"]))


def sample_windows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens (int64, (count, length))."""
    if tokens.numel() <= length:
        raise ValueError(f"corpus split of {tokens.numel()} bytes is shorter than a window of {length}")
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)].long()
