"""skiptune-search: automatic Skip-Tuning (Ma et al., ICML 2024) of diffusion UNets.

``from skiptune_search import apply`` needs nothing but torch (and diffusers for diffusers models).
"""

from .schedule import RhoSchedule, ScheduleError, SkipInfo, load_schedule
from .skips import SkipController, apply

__all__ = ["RhoSchedule", "ScheduleError", "SkipController", "SkipInfo", "apply", "load_schedule"]
__version__ = "0.1.0"
