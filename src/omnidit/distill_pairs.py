"""The regression method's pairs: (noise, teacher sample) drawn once and kept in a run's ``pairs`` folder.

Pairs are drawn in chunks, each seeded by its number alone, so a run that stops keeps the chunks it finished and a
resumed one draws only the rest; each chunk file records what it was drawn with (the teacher, its weights, its
sampling settings, the data) and a run refuses chunks drawn otherwise. Training reads the rows of each batch from
the files (``PairStore``), so memory holds one batch, not the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from omnidit import distributed as D
from omnidit.errors import OmniditError

PAIR_CHUNK = 256  # pairs per file (with several processes, rounded up to a multiple of their number)
PAIR_KEYS = ("noise", "sample", "index", "scale")  # (n, N, D) noise and teacher sample, (n,) data index and scale


def chunk_rows(pairs: int, world_size: int) -> int:
    """Rows per chunk file: PAIR_CHUNK (fewer when fewer pairs are asked for), a multiple of the processes, which
    each draw their share of every chunk."""
    rows = min(PAIR_CHUNK, pairs)
    return math.ceil(rows / world_size) * world_size


def drawn_with(path: Path) -> str | None:
    """What a chunk file was drawn with (its safetensors metadata), or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("drawn_with")


class PairStore:
    """``total`` pairs in chunk files of ``rows`` each, read a batch of rows at a time."""

    def __init__(self, files: Sequence[Path], rows: int, total: int) -> None:
        self.files, self.rows_per_file, self.total = list(files), rows, total

    def __len__(self) -> int:
        return self.total

    def rows(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """The pairs at ``indices`` (each < len), in that order: {key: (len(indices), ...)} for ``PAIR_KEYS``."""
        from safetensors import safe_open

        out: dict[str, list[Tensor]] = {key: [] for key in PAIR_KEYS}
        with ExitStack() as stack:
            opened = {}
            for i in indices:
                number, row = divmod(int(i), self.rows_per_file)
                if number not in opened:
                    opened[number] = stack.enter_context(safe_open(str(self.files[number]), framework="pt"))
                for key in PAIR_KEYS:
                    out[key].append(opened[number].get_slice(key)[row:row + 1])
        return {key: torch.cat(parts) for key, parts in out.items()}


def draw_pairs(folder: Path, total: int, setting: str, draw_chunk: Callable[[int, int], dict[str, Tensor]],
               world: D.World, progress: bool, announce: str) -> PairStore:
    """The pairs in ``folder``, drawing the chunks that are missing: ``draw_chunk(number, rows)`` runs on every rank
    in lockstep (the teacher may be sharded) and returns the whole chunk, which rank 0 writes with ``setting``
    (a JSON string) in its metadata. Chunks drawn with another setting are an error, not targets."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    rows = chunk_rows(total, world.world_size)
    files = [folder / f"chunk-{i:05d}.safetensors" for i in range(math.ceil(total / rows))]
    for f in files:
        if f.exists() and drawn_with(f) != setting:
            raise OmniditError(f"{f} was drawn by another teacher or with other settings than this run's",
                               hint=f"delete {folder} to draw the pairs again (or use another run folder)")
    missing = [i for i, f in enumerate(files) if not f.exists()]
    D.barrier(world)  # every rank has its list before rank 0 writes anything
    if missing and progress:
        print(f"drawing {total} teacher samples for regression ({announce}) into {folder}", flush=True)
    for i in tqdm(missing, disable=not progress, unit="chunk", desc="teacher samples", dynamic_ncols=True):
        chunk = draw_chunk(i, rows)
        if world.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = files[i].with_suffix(".tmp")
            save_file(chunk, str(temporary), metadata={"drawn_with": setting})
            temporary.replace(files[i])  # whole chunks only
    D.barrier(world)
    return PairStore(files, rows, total)
