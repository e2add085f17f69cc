"""Before and after: the service at an earlier commit and as checked out now, alternated.

    python -m bench.ab --before REF [--rounds 3] [--seconds 8] [--json out.json]

The commit REF is checked out into a temporary git worktree; each round starts the service
from it, then from this checkout, then the naive app (bench/naive.py, the concurrency-1
reference), and measures `/encode` with one JPEG per request (multipart and the raw body) at
concurrency 1 and 32 with the same load generator as bench.load. The bench code and the model
are this checkout's for both, so only the service differs. Alternating rounds on the same
machine and taking medians keeps a machine that speeds up or slows down between runs from
deciding the comparison.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.common import REPO, arguments, machine, table, write_json
from bench.load import NAIVE, measure, run_loop, server

CELLS = (("multipart", 1), ("jpeg", 1), ("multipart", 32), ("jpeg", 32))
FIELDS = ("img_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_img", "frontend_cpu_ms_per_img")


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """`ref` checked out, detached, in a temporary worktree removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        path = Path(tmp) / "before"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def service_at(tree: Path) -> list[str]:
    """`python -m service` with `tree`'s service package first on the path."""
    launch = f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); "
    return [sys.executable, "-c", launch + "runpy.run_module('service', run_name='__main__')"]


def run(before: str, rounds: int, seconds: float, client: str | None = None) -> dict:
    runs = []
    with worktree(before) as old:
        for round_ in range(rounds):
            for name, argv, cells in (
                ("before", service_at(old), CELLS),
                ("after", service_at(REPO), CELLS),
                ("naive", NAIVE, (("multipart", 1),)),
            ):
                with server({}, argv) as srv:
                    for body, concurrency in cells:
                        result = run_loop(measure(srv, "encode", concurrency, seconds,
                                                  body_kind=body, client=client))  # fmt: skip
                        row = {"round": round_, "server": name, "body": body,
                               "concurrency": concurrency, "client": result["client"],
                               **{k: result[k] for k in FIELDS}}  # fmt: skip
                        runs.append(row)
                        print(f"  round {round_} {name:6} {body:9} c={concurrency:<3} "
                              f"{row['img_per_s']:7.1f} img/s  p50 {row['p50_ms']} ms  "
                              f"front end {row['frontend_cpu_ms_per_img']} ms/img", flush=True)  # fmt: skip
    return {"before": before, "after": _head(), "rounds": rounds, "runs": runs,
            "medians": medians(runs)}  # fmt: skip


def medians(runs: list[dict]) -> list[dict]:
    """Per (server, body, concurrency): the median of each figure over the rounds, and at
    concurrency 1 the median of each round's p50 over that round's naive p50."""
    naive = {r["round"]: r["p50_ms"] for r in runs if r["server"] == "naive"}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["server"], r["body"], r["concurrency"]), []).append(r)
    out = []
    for (name, body, concurrency), rows in groups.items():
        row = {"server": name, "body": body, "concurrency": concurrency, "n": len(rows)}
        for field in FIELDS:
            values = [r[field] for r in rows if r[field] is not None]
            row[field] = round(statistics.median(values), 3) if values else None
        if concurrency == 1 and naive:
            row["p50_vs_naive"] = round(
                statistics.median(r["p50_ms"] / naive[r["round"]] for r in rows), 2
            )
        out.append(row)
    return out


def _head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], default_seconds=8.0,
                     valued={"--before": None, "--rounds": "3"})  # fmt: skip
    result = {"machine": machine(), **run(args.before, int(args.rounds), args.seconds)}
    columns = [("server", "server"), ("body", "body"), ("concurrency", "conc"), ("n", "rounds"),
               *((f, f) for f in FIELDS), ("p50_vs_naive", "p50 / naive p50")]  # fmt: skip
    print(table(result["medians"], columns, f"Medians, {result['rounds']} alternated rounds"))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
