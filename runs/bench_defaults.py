"""Every objective run as a new user runs it: python -m runs.bench defaults [--objectives dsno kd ...]

Each objective is trained with no flags but `--objective NAME` (the headline command adds `--backbone fno`), in a
fresh process and a fresh run directory, exactly as the README says, with its true defaults. Recorded per run: the
exit code, wall time, peak resident memory (the child's ru_maxrss), the run's closing lines (what it trained and,
for students, the quality report against the teacher at the same NFE). Written to <out>.md and <out>.json; with
--append, rows for other objectives are kept.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runs.cli import ArgumentParser, cli_errors

HEADLINE = ["--backbone", "fno", "--objective", "dsno"]


def command_for(name):
    return HEADLINE if name == "dsno" else ["--objective", name]


def run_default(name, workdir, timeout):
    """One default run in a subprocess: a dict of what was measured (peak memory from that child's own rusage)."""
    args = command_for(name)
    log_out, log_err = (open(Path(workdir) / f"{name}.{kind}", "w+") for kind in ("out", "err"))
    tic = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "runs.train", *args, "--out", str(Path(workdir) / name)],
                             stdout=log_out, stderr=log_err, cwd=Path(__file__).resolve().parents[1])
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    _, status, usage = os.wait4(child.pid, 0)
    timer.cancel()
    seconds = time.perf_counter() - tic
    code = os.waitstatus_to_exitcode(status)
    code = "killed (timeout)" if code == -9 and seconds >= timeout else code
    out, err = (f.seek(0) or f.read() for f in (log_out, log_err))
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes (Linux reports KiB)
    lines = [line for line in out.splitlines() if line.startswith(("trained", "quality:"))]
    row = {"objective": name, "command": "python -m runs.train " + " ".join(args), "exit": code,
           "wall_min": round(seconds / 60, 2), "peak_rss_gib": round(peak / 2**30, 2),
           "report": " / ".join(lines)}
    quality = Path(workdir) / name / "quality.json"
    if quality.exists():
        report = json.loads(quality.read_text())
        row.update(map_rmse=report["map_rmse"], teacher_map_rmse=report["teacher_map_rmse"], nfe=report["nfe"],
                   beats_teacher=report["map_rmse"] < report["teacher_map_rmse"])
    if code != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    return row


def markdown(result):
    lines = ["# Every objective with its true defaults", "",
             f"`python -m runs.bench defaults` on {result['machine']}, torch {result['torch']}, "
             f"{result['date']}. Each row is a fresh process and run directory; peak memory is the process's maximum "
             "resident set (its own ru_maxrss). map_rmse: the "
             "student's one-step RMSE to the teacher's ODE map on held-out noises; teacher: the teacher's own at the "
             "same NFE.", "",
             "| command | exit | wall (min) | peak RSS (GiB) | map_rmse | teacher at same NFE | closing lines |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| `{r['command']}` | {r['exit']} | {r['wall_min']} | {fmt(r['peak_rss_gib'])} | "
                     f"{fmt(r.get('map_rmse'))} | {fmt(r.get('teacher_map_rmse'))} | "
                     f"{r['report'] or r.get('error', '')} |")
    return "\n".join(lines + [""])


def main(argv=None):
    from objectives import OBJECTIVES
    p = ArgumentParser(prog="python -m runs.bench defaults", description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", help="default: every registered objective")
    p.add_argument("--out", default="bench/defaults")
    p.add_argument("--timeout-min", type=float, default=30.0, help="per run")
    p.add_argument("--append", action="store_true", help="keep earlier rows of other objectives")
    args = p.parse_args(argv)
    with cli_errors():
        names = args.objectives or sorted(OBJECTIVES)
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective(s) {', '.join(unknown)}; known: {', '.join(sorted(OBJECTIVES))}")
        out = Path(args.out)
        import torch
        result = {"machine": f"{platform.machine()} with {os.cpu_count()} CPU cores", "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d"), "rows": []}
        if args.append and out.with_suffix(".json").exists():
            result["rows"] = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"]
                              if r["objective"] not in names]
        with tempfile.TemporaryDirectory() as workdir:
            for name in names:
                row = run_default(name, workdir, args.timeout_min * 60)
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
                out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
