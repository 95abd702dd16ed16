"""Training objectives, one file per method. OBJECTIVES is open: OBJECTIVES["mine"] = MyObjective."""
from objectives.base import Objective, pick
from objectives.boot import BOOT
from objectives.cd import CD
from objectives.ct import CT
from objectives.dsm import DSM
from objectives.dsno import DSNO
from objectives.ect import ECT
from objectives.ict import ICT
from objectives.kd import KD
from objectives.progressive import Progressive
from objectives.reflow import Reflow
from objectives.tract import TRACT

OBJECTIVES = {
    "dsm": DSM,
    "kd": KD,
    "progressive": Progressive,
    "reflow": Reflow,
    "boot": BOOT,
    "dsno": DSNO,
    "cd": CD,
    "ct": CT,
    "ict": ICT,
    "ect": ECT,
    "tract": TRACT,
}
