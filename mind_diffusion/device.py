"""Which backend the graphs run on, shared by every entry point.

``pick_device`` chooses the MindSpore device target for a run (the user's
choice, else Ascend when this machine has one, else CPU).
"""
import os


def pick_device(requested=None):
    """The requested backend, else Ascend when this MindSpore build and machine have one, else CPU."""
    if requested:
        return requested
    if os.path.exists("/dev/davinci0") or os.environ.get("ASCEND_HOME_PATH"):
        return "Ascend"
    return "CPU"
