"""Training objectives, one file per method. OBJECTIVES is open: OBJECTIVES["mine"] = MyObjective."""
from objectives.base import Objective, pick
from objectives.dsm import DSM
from objectives.progressive import Progressive

OBJECTIVES = {
    "dsm": DSM,
    "progressive": Progressive,
}
