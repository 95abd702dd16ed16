"""python -m runs.list: every registry, each entry with the first line of its docstring."""
from data import DATASETS
from metrics import METRICS
from models import BACKBONES
from objectives import OBJECTIVES
from objectives.distances import DISTANCES
from solvers import SCHEDULES, SOLVERS

REGISTRIES = {"backbones": BACKBONES, "objectives": OBJECTIVES, "solvers": SOLVERS, "schedules": SCHEDULES,
              "datasets": DATASETS, "metrics": METRICS, "distances": DISTANCES}


def summary(entry):
    doc = (entry.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else "(undocumented)"


def main():
    for title, registry in REGISTRIES.items():
        print(f"{title}:")
        width = max(map(len, registry), default=0)
        for name, entry in registry.items():
            print(f"  {name:<{width}}  {summary(entry)}")


if __name__ == "__main__":
    main()
