"""Training objectives, one file per method. OBJECTIVES is open: OBJECTIVES["mine"] = MyObjective."""
from objectives.base import Objective, pick
from objectives.dsm import DSM

OBJECTIVES = {
    "dsm": DSM,
}
