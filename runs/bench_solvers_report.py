"""The solver benchmark's report: Markdown tables and the error-against-NFE plot (runs/bench_solvers.py runs it)."""


def _cell(value):
    return "-" if value is None or value == "" else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _grid(rows, key, schedules, nfes):
    """Markdown table: one row per solver, one column per NFE, cells 'karras / optimised' values of `key`."""
    lines = ["| solver | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = []
        for nfe in nfes:
            found = {r["schedule"]: r.get(key) for r in rows if r["solver"] == solver and r["nfe"] == nfe}
            cells.append(" / ".join(_cell(found.get(s)) for s in schedules) if found else "-")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    return lines


def _iterations(rows):
    """The fits' loss evaluations per Powell start, as found in the rows ('50, 25 (see the csv)' when they differ)."""
    found = sorted({r["fit_iters"] for r in rows if r.get("fit_iters")}, reverse=True)
    return "no" if not found else str(found[0]) if len(found) == 1 else ", ".join(map(str, found)) + " (see the csv)"


def markdown(result, plot_name):
    setup, rows = result["setup"], result["rows"]
    gmm = [r for r in rows if r["part"] == "gmm"]
    lines = ["# ODE solvers: error to the exact ODE map, fitted schedules, overhead (runs/bench_solvers.py)", "",
             f"- {setup['device']} ({setup['machine']}), torch {setup['torch']}; sigma {setup['sigma_max']:g} -> "
             f"{setup['sigma_min']:g} -> 0"]
    if gmm:
        lines.append(f"- mixtures: {setup['n']} evaluation noises; schedules fitted (solvers.optimise, "
                     f"{_iterations(gmm)} loss evaluations per Powell start) on {setup['opt_n']} OTHER noises")
    if "mnist_n" in setup:
        mnist = [r for r in rows if r["part"] == "mnist"]
        lines.append(f"- MNIST ({setup['mnist_run']}): {setup['mnist_n']} samples per cell, scored against "
                     f"{setup['mnist_n']} real digits; schedules fitted ({_iterations(mnist)} loss evaluations "
                     f"per Powell start) on {setup['mnist_opt_n']} OTHER noises to Heun at {setup['mnist_reference_nfe']} NFE")
    lines += [f"- {note}" for note in setup.get("notes", [])]
    lines += ["",
             "## References", "",
             "| data | reference | change when the tolerances halve (max abs) | smallest RMSE reported | "
             "floor: RMSE of x = D(x(sigma_min)) |", "|---|---|---|---|---|"]
    for ref in result["references"]:
        if ref["data"] == "mnist":
            lines.append(f"| mnist | {ref['reference']} | RMSE to half its NFE: "
                         f"{ref['reference_change_at_half_nfe']:.3g} | | MNIST-FID of {ref['n']} real digits "
                         f"against others: {ref['floor_fid_mnist']} |")
        else:
            flag = "" if ref["reference_ok"] else " **(not << smallest error)**"
            lines.append(f"| {ref['data']} | DOP853, {ref['reference_nfe']} evaluations | "
                         f"{ref['tolerance_change']:.2g}{flag} | {ref['smallest_rmse']:.3g} | "
                         f"{ref['floor_rmse']:.3g} |")
    for data in dict.fromkeys(r["data"] for r in rows if r["part"] == "gmm"):
        part = [r for r in rows if r["data"] == data]
        nfes = sorted({r["nfe"] for r in part})
        lines += ["", f"## {data}: RMSE of x0 to the exact map, karras / optimised", ""]
        lines += _grid(part, "rmse", ("karras", "optimised"), nfes)
        lines += ["", "ODE error alone (Karras, state at sigma_min vs exact x(sigma_min)):", ""]
        lines += _grid(part, "rmse_at_sigma_min", ("karras",), nfes)
    overhead = [r for r in rows if r["part"] == "overhead"]
    if overhead:
        lines += ["", f"## Solver overhead ({overhead[0]['data']}, D = 0.5 x, NFE {overhead[0]['nfe']})", "",
                  "| solver | steps | own time per step (us) | trivial D per call (us) | own time / tiny U-Net call |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['solver']} | {r['steps']} | {r['overhead_us_per_step']} | {r['denoiser_us_per_call']} | "
                  f"{100 * r['overhead_us_per_step'] / r['tiny_unet_us_per_call']:.1f}% |" for r in overhead]
        lines += ["", f"Tiny U-Net (16 base channels, ~0.3 M parameters) per call on the same batch: "
                  f"{overhead[0]['tiny_unet_us_per_call']} us."]
    mnist = [r for r in rows if r["part"] == "mnist"]
    if mnist:
        nfes = sorted({r["nfe"] for r in mnist})
        lines += ["", "## MNIST teacher: MNIST-FID, karras / optimised", ""]
        lines += _grid(mnist, "fid_mnist", ("karras", "optimised"), nfes)
        lines += ["", "RMSE to the fine reference, karras / optimised:", ""]
        lines += _grid(mnist, "rmse", ("karras", "optimised"), nfes)
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        groups = {}
        for s in result["skipped"]:
            groups.setdefault((s["solver"], s["data"], s["reason"]), []).append(str(s["nfe"]))
        lines += [f"- {solver} ({data}) at NFE {', '.join(nfes)}: {reason}"
                  for (solver, data, reason), nfes in groups.items()]
    if plot_name:
        lines += ["", f"![RMSE to the exact map against NFE]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_errors(rows, path, references=()):
    """Log-log RMSE against NFE, one panel per data set (and one of MNIST-FID when there is one), one colour per
    solver (solid karras, dashed optimised), the x = D floor dotted grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(data, "rmse") for data in dict.fromkeys(r["data"] for r in rows
                                                     if r["part"] in ("gmm", "mnist") and r.get("rmse"))]
    panels += [("mnist", "fid_mnist")] if any(r.get("fid_mnist") for r in rows) else []
    if not panels:
        return False
    solvers = list(dict.fromkeys(r["solver"] for r in rows if any(r["data"] == d and r.get(k) for d, k in panels)))
    colours = {s: plt.get_cmap("tab10" if len(solvers) <= 10 else "tab20")(i % 20) for i, s in enumerate(solvers)}
    markers = "osD^v<>pP*Xh"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.8, 4.2), squeeze=False)
    for ax, (data, key) in zip(axes[0], panels):
        for i, solver in enumerate(solvers):
            for schedule, line in (("karras", "-"), ("optimised", "--")):
                points = sorted((r["nfe"], r[key]) for r in rows if r["data"] == data and r["solver"] == solver
                                and r["schedule"] == schedule and r.get(key))
                if points:
                    ax.plot(*zip(*points), line, marker=markers[i % len(markers)], color=colours[solver],
                            markersize=3, linewidth=1, label=solver if schedule == "karras" else None)
        floor = next((r.get("floor_rmse" if key == "rmse" else "floor_fid_mnist") for r in references
                     if r["data"] == data), None)
        if floor:
            ax.axhline(floor, color="grey", linestyle=":",
                       label="floor: x = D at sigma_min" if key == "rmse" else "floor: real vs real")
        nfes = sorted({r["nfe"] for r in rows if r["data"] == data})
        ax.set(xscale="log", yscale="log", xlabel="NFE",
               ylabel="RMSE to the reference" if key == "rmse" else "MNIST-FID",
               title=f"{data} {'RMSE' if key == 'rmse' else 'FID'} (solid karras, dashed optimised)")
        ax.set_xticks(nfes, [str(nfe) for nfe in nfes])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
