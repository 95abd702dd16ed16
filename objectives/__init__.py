"""Training objectives, one file per method. OBJECTIVES is open: OBJECTIVES["mine"] = MyObjective."""
from objectives.add import ADD
from objectives.base import Objective, pick
from objectives.boot import BOOT
from objectives.cd import CD
from objectives.ctm import CTM
from objectives.ct import CT
from objectives.diff_instruct import DiffInstruct
from objectives.diffratio import DiffRatio
from objectives.dmd import DMD
from objectives.dmd2 import DMD2
from objectives.dsm import DSM
from objectives.dsno import DSNO
from objectives.ect import ECT
from objectives.guidance_distill import GuidanceDistill, GuidanceProgressive
from objectives.ict import ICT
from objectives.kd import KD
from objectives.meanflow import MeanFlow
from objectives.progressive import Progressive
from objectives.reflow import Reflow
from objectives.scm import SCD, SCT
from objectives.sid import SiD
from objectives.tract import TRACT
from objectives.ufogen import UFOGen

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
    "scd": SCD,
    "sct": SCT,
    "ctm": CTM,
    "meanflow": MeanFlow,
    "diff_instruct": DiffInstruct,
    "dmd": DMD,
    "dmd2": DMD2,
    "sid": SiD,
    "diffratio": DiffRatio,
    "add": ADD,
    "ufogen": UFOGen,
    "guidance_distill": GuidanceDistill,
    "guidance_progressive": GuidanceProgressive,
}
