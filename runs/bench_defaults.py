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
from runs.provenance import provenance

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
        row.update({k: report[k] for k in ("nfe", "map_rmse", "teacher_map_rmse", "swd", "teacher_swd") if k in report})
        ours, theirs = ("map_rmse", "teacher_map_rmse") if "map_rmse" in report else ("swd", "teacher_swd")
        row["beats_teacher"] = report[ours] < report[theirs]
    if code != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    return row


def quality_numbers(report_line):
    """{name: number} from a run's printed `quality: name value, ...` line (rows recorded before quality.json's
    numbers were copied into them)."""
    text = report_line.partition("quality: ")[2]
    numbers = {}
    for item in text.split(", "):
        name, _, value = item.partition(" ")
        try:
            numbers[name] = float(value)
        except ValueError:
            pass
    return numbers


def markdown(result):
    lines = ["# Every objective with its true defaults", "",
             f"`python -m runs.bench defaults` on {result['machine']}, torch {result['torch']}, "
             f"{result['date']}. Each row is a fresh process and run directory; peak memory is the process's maximum "
             "resident set (its own ru_maxrss). map_rmse: the "
             "student's one-step RMSE to the teacher's ODE map on held-out noises; swd: sliced Wasserstein distance of "
             "its samples to the data (the measure for students that match distributions rather than the map); "
             "teacher: the same for the teacher sampled at the student's NFE.", "",
             "| command | exit | wall (min) | peak RSS (GiB) | map_rmse (teacher) | swd (teacher) | beats teacher | "
             "closing lines |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "quality:" in r["report"] and "swd" not in r:
            r = {**{k: v for k, v in quality_numbers(r["report"]).items()
                    if k in ("map_rmse", "teacher_map_rmse", "swd", "teacher_swd")}, **r}
            ours = "map_rmse" if "map_rmse" in r else "swd"
            r["beats_teacher"] = r[ours] < r[f"teacher_{ours}"]
        fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        pair = lambda a, b: f"{fmt(r[a])} ({fmt(r[b])})" if a in r else ""  # noqa: E731
        lines.append(f"| `{r['command']}` | {r['exit']} | {r['wall_min']} | {fmt(r['peak_rss_gib'])} | "
                     f"{pair('map_rmse', 'teacher_map_rmse')} | {pair('swd', 'teacher_swd')} | "
                     f"{fmt(r.get('beats_teacher'))} | {r['report'] or r.get('error', '')} |")
    for note in result.get("notes", []):
        lines += ["", note]
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
                  "date": time.strftime("%Y-%m-%d"), "provenance": provenance(), "rows": []}
        if args.append and out.with_suffix(".json").exists():
            before = json.loads(out.with_suffix(".json").read_text())
            result["rows"] = [r for r in before["rows"] if r["objective"] not in names]
            result["notes"] = before.get("notes", [])
        with tempfile.TemporaryDirectory() as workdir:
            for name in names:
                row = run_default(name, workdir, args.timeout_min * 60)
                print(json.dumps(row), flush=True)
                result["rows"] = sorted(result["rows"] + [row], key=lambda r: r["objective"])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
                out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
