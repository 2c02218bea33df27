"""Flame graphs of a benchmark's processes while it measures: `make profile`.

With BENCH_PROFILE set (process names as the CPU table shows them, comma
separated, or `all`), every scenario's measured run is also sampled by py-spy
(a dev dependency): one `py-spy record` per named process attaches by pid when
the CPU meter takes its first snapshot and stops (SIGINT, which makes py-spy
write its file) when the per-call figures are read. The SVGs (or, with
BENCH_PROFILE_FORMAT=raw, collapsed stacks) go to bench/profiles/
(git-ignored), one per process and measured run. The CPU
figures of a profiled run include the sampler's pauses: read costs from an
unprofiled run, and where they go from the flame graph.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV = "BENCH_PROFILE"
PROFILE_RATE_ENV = "BENCH_PROFILE_RATE"
# flamegraph (SVG, the default), raw (collapsed stacks, for grep and scripts) or speedscope.
PROFILE_FORMAT_ENV = "BENCH_PROFILE_FORMAT"
SUFFIXES = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# Samples per second per process: enough for a 20 s run, light on a shared machine.
DEFAULT_RATE = 200


def wanted(names: Mapping[str, int], spec: str | None = None) -> dict[str, int]:
    """The processes BENCH_PROFILE names, among `names` (name -> pid). A run
    without a named process (a baseline's own server) profiles nothing; the
    names it does have are printed, so a misspelt name is seen."""
    spec = os.environ.get(PROFILE_ENV, "") if spec is None else spec
    asked = [n.strip() for n in spec.split(",") if n.strip()]
    if not asked:
        return {}
    if "all" in asked:
        return dict(names)
    unknown = [n for n in asked if n not in names]
    if unknown and names:
        print(
            f"bench | {PROFILE_ENV}: no {', '.join(unknown)} in this run"
            f" (its processes: {', '.join(sorted(names))})",
            file=sys.stderr,
        )
    return {n: names[n] for n in asked if n in names}


def py_spy() -> str:
    """py-spy from this interpreter's environment (make install puts it there)."""
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: make install (it is a dev dependency)")
    return found


@dataclass
class Profiler:
    """py-spy samplers over some processes, for one measured run."""

    targets: dict[str, int]
    out_dir: Path = PROFILES_DIR
    samplers: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def start(self) -> None:
        if self.samplers or not self.targets:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        rate = os.environ.get(PROFILE_RATE_ENV, str(DEFAULT_RATE))
        form = os.environ.get(PROFILE_FORMAT_ENV, "flamegraph")
        if form not in SUFFIXES:
            raise ValueError(f"{PROFILE_FORMAT_ENV} is one of {', '.join(SUFFIXES)}, not {form!r}")
        for name, pid in self.targets.items():
            out = self.out_dir / f"{stamp}-{name}.{SUFFIXES[form]}"
            proc = subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    rate,
                    "--output",
                    str(out),
                    "--format",
                    form,
                    # Sample without pausing the process: the run stays the run measured.
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self.samplers[name] = (proc, out)

    def stop(self) -> list[Path]:
        """Stop every sampler; the SVGs written (a failed sampler says why on stderr)."""
        written = []
        for proc, _ in self.samplers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, (proc, out) in self.samplers.items():
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if out.exists():
                written.append(out)
                print(f"bench | profile of {name}: {out}", flush=True)
            else:
                reason = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                print(f"bench | profile of {name} failed: {reason[0]}", file=sys.stderr)
        self.samplers.clear()
        return written
