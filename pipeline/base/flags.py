"""The one owner of the command line's spellings that the library needs too.

The CLI declares its options with these names; ``report`` and ``bench`` rebuild the
commands that made a run, a cache or a measurement with them. Nothing here imports
click or torch.
"""

from __future__ import annotations

# a configuration field whose option is not spelled --field-name
FLAG_NAMES = {"drop_rate": "dropout"}

# when a training schedule moves: after every optimizer update, or once per epoch
SCHED_ON = ("update", "epoch")

# how --clip-grad clips, timm's dispatch_clip_grad modes: the gradients' global L2 norm, each
# element's value, or adaptive clipping (AGC, Brock et al. 2021: VALUE is the clip factor)
CLIP_MODES = ("norm", "value", "agc")

# the heads a detection model is scored through (evaluate --head): the one-to-many head with
# NMS, or a YOLO26's NMS-free one-to-one head (Ultralytics' nms=False)
DETECT_HEADS = ("one2many", "one2one")

# the command that makes each kind of run directory
COMMANDS = {
    "teacher": "train-teacher",
    "student": "train-student",
    "online-student": "distill-online",
}

# options a training command needs unless --resume; a rebuilt command shows them even
# where they equal their defaults
REQUIRED_TO_START = {
    "train-teacher": ("model", "data", "epochs", "out"),
    "train-student": ("model", "data", "epochs", "out", "cache", "alpha"),
    "distill-online": ("model", "data", "epochs", "out", "teacher", "alpha", "temperature"),
}


def flag(field: str) -> str:
    """``drop_rate`` -> ``--dropout``, ``batch_size`` -> ``--batch-size``."""
    return "--" + FLAG_NAMES.get(field, field).replace("_", "-")
