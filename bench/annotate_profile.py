"""Where the served process spends the annotation run: py-spy against its pid.

bench/annotate.py ``--profile FILE`` records the ``onecluster serve`` process with py-spy
(a sampling profiler: nothing changes in the server, which runs as in the plain
benchmark) during the measured HTTP window, counting only samples that hold the GIL (the
process's CPU, not its event loop waiting), keeps the collapsed stacks in FILE and prints
a summary: samples by area (own time), the top functions by own time, and the
repository's functions by inclusive time.

Own time is trustworthy. Inclusive time of the repository's functions is a lower bound:
SQLAlchemy runs its synchronous core in greenlets, whose stacks do not lead back to the
coroutine that awaited them.

py-spy is taken from PATH, else run through ``uvx py-spy``; it needs ptrace rights on the
server process (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path

from bench.profile_read import area_of

ROOT = str(Path(__file__).resolve().parents[1]) + "/"

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")
MARKETPLACE = ("/services/marketplace/", "services.marketplace ({module})")
# Libraries the annotation path adds to bench/profile_read.py's areas; the first match wins.
EXTRA_AREAS = [
    ("/asyncpg/", "asyncpg (PostgreSQL driver)"),
    ("/uvicorn/", "uvicorn"),
    ("/httptools/", "uvicorn"),
    ("/redis/", "redis client"),
    ("/greenlet/", "greenlet switches"),
]


def py_spy_command() -> list[str] | None:
    if path := shutil.which("py-spy"):
        return [path]
    if uvx := shutil.which("uvx"):
        return [uvx, "py-spy"]
    return None


async def start_recording(
    pid: int, seconds: float, out: Path, rate: int = 250
) -> asyncio.subprocess.Process:
    command = py_spy_command()
    if command is None:
        raise RuntimeError("py-spy is not installed and uvx is not there to run it")
    return await asyncio.create_subprocess_exec(
        *command,
        "record",
        f"--pid={pid}",
        f"--duration={max(1, round(seconds))}",
        f"--rate={rate}",
        "--format=raw",
        "--full-filenames",
        "--nonblocking",
        "--gil",  # only samples holding the GIL: CPU, not an event loop waiting
        f"--output={out}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def _area(filename: str, func: str) -> str:
    if MARKETPLACE[0] in filename:
        return MARKETPLACE[1].format(module=filename.split(MARKETPLACE[0], 1)[1][:-3])
    for needle, label in EXTRA_AREAS:
        if needle in filename:
            return label
    if filename.startswith("<frozen") or filename == "~":
        return "Python standard library"
    area = area_of(filename, func)
    return "other" if area.startswith("load client") else area


def summarize(raw: Path, *, server_ms_per_annotation: float | None, top: int = 20) -> list[str]:
    """A short report of py-spy's collapsed stacks (``frame;frame;… count`` per line)."""
    own: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [m for f in stack.split(";") if (m := FRAME.match(f))]
        if not frames:
            continue
        total += count
        last = frames[-1]
        name = f"{last['func']} ({_short(last['file'])}:{last['line']})"
        own[name] += count
        by_area[_area(last["file"], last["func"])] += count
        seen = set()
        for frame in frames:
            if frame["file"].startswith(ROOT) and "/.venv/" not in frame["file"]:
                key = f"{frame['func']} ({_short(frame['file'])})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
    if not total:
        return ["py-spy recorded no samples (was the server busy, and ptrace allowed?)"]
    scale = server_ms_per_annotation or 0.0

    def row(count: int, what: str) -> str:
        share = count / total
        ms = f"{share * scale:7.3f}" if scale else "      -"
        return f"  {share:6.1%} {ms}  {what}"

    lines = [
        f"{total} samples of the served process holding the GIL; shares of them, and the"
        " same as server CPU ms per annotation:",
        "",
        "Own time by area:",
    ]
    lines += [row(c, a) for a, c in by_area.most_common() if c / total >= 0.005]
    lines += ["", f"Top {top} functions by own time:"]
    lines += [row(c, f) for f, c in own.most_common(top)]
    lines += ["", "The repository's functions by inclusive time (a lower bound, see above):"]
    lines += [row(c, f) for f, c in inclusive.most_common(top) if "bench/" not in f]
    return lines


def _short(filename: str) -> str:
    for marker in ("site-packages/", ROOT, "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename
