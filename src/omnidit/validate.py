"""Checks for numbers that enter from outside (CLI flags, config values, API arguments).

One function, so that every entry point says the same thing in the same words: the name, the value, and
the range it must lie in. NaN and infinities never pass.
"""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path

import torch

from omnidit.errors import OmniditError


def check_number(name: str, value: object, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, hint: str | None = None) -> float | int:
    """``value`` as a finite number within [low, high] (``low_open``: low excluded), or an OmniditError.

    ``integer``: it must also be a whole number (returned as int). Booleans are not numbers here.
    """
    bad = isinstance(value, bool)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        bad = True
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if bad or not math.isfinite(number) or integer and number != int(number):
        kind = "a whole number" if integer else "a finite number"
        raise OmniditError(f"{name} must be {kind}, got {shown}", hint=hint or _range_text(low, high, low_open))
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or high is not None and number > high:
        raise OmniditError(f"{name} must be {_range_text(low, high, low_open)}, got {shown}", hint=hint)
    return int(number) if integer else number


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    def shown(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e20 else f"{x:g}"

    lo = None if low is None else f"{'>' if low_open else '>='} {shown(low)}"
    hi = None if high is None else f"<= {shown(high)}"
    return " and ".join(p for p in (lo, hi) if p) or "finite"


def check_output_path(flag: str, path: str | Path, example: str = "out.png") -> Path:
    """An output file path whose folder exists and which is not itself a folder, or an OmniditError.

    Checked before any work is done, so that a typo in a folder name costs nothing and creates nothing.
    """
    path = Path(path)
    if path.is_dir():
        raise OmniditError(f"{flag} {path} is a folder", hint=f"name a file inside it, e.g. {path / example}")
    if not path.parent.is_dir():
        raise OmniditError(f"{flag}: the folder {path.parent} does not exist",
                           hint=f"create it first (mkdir -p {path.parent}) or write elsewhere")
    return path


def parse_size(text: str) -> tuple[int, int]:
    """'64x32' -> (width=64, height=32); each side 1 to 6 ASCII digits."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", str(text).lower(), re.ASCII)
    if found is None or min(int(g) for g in found.groups()) <= 0:
        raise OmniditError(f"malformed size '{text}'", hint="use WIDTHxHEIGHT, e.g. --size 64x32")
    return int(found.group(1)), int(found.group(2))


def random_seed() -> int:
    """A fresh seed for ``--seed -1``: drawn from the OS, in [0, 2**31), so it can be recorded and reused."""
    return secrets.randbelow(2**31)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, the CPU's MemAvailable (Linux); None
    where it cannot be read (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# Of the free memory, the share a request may plan to use: the estimates leave out allocator slack and buffers.
USABLE_FRACTION = 0.9


def check_memory(need: int, device: torch.device, what: str, hint: str) -> None:
    """An OmniditError when ``need`` bytes exceed USABLE_FRACTION of what ``device`` has free: one line naming the
    need and what is available, before anything is allocated."""
    free = available_memory(device)
    if free is not None and need > USABLE_FRACTION * free:
        raise OmniditError(f"{what} needs about {_gib(need)} of memory, but the {device.type} has {_gib(free)} "
                           "free", hint=hint)


def _gib(n: int) -> str:
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:,.0f} TiB"
