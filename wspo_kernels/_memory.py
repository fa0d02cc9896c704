"""Resident-memory probes (Linux /proc): how benchmarks and the demo measure CPU peak memory.

Peak extra memory of a step = the resident-set high-water mark (VmHWM) after the step minus the
resident set before it (less what the native CPU gradient-buffer cache holds), with the mark reset
(``/proc/self/clear_refs``) just before the step.
Elsewhere the probes return NaN rather than a made-up number.
"""
import math


def status_mib(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in MiB, NaN where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start_window() -> float:
    """Resident MiB now, with the high-water mark reset: pass it to ``peak_extra_mib``.

    What the native CPU gradient-buffer cache holds is left out of the resident set: a step that reuses
    that block needs it as much as a step that allocates one, so it counts as the step's memory.
    """
    from .backends.native import cached_bytes
    base = status_mib("VmRSS") - cached_bytes() / 2 ** 20
    return base if reset_peak() else math.nan


def peak_extra_mib(base: float) -> float:
    return status_mib("VmHWM") - base
