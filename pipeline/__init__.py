"""kdpipe: offline knowledge distillation.

Stage one (:func:`pipeline.teach.cache_teacher`) runs a teacher once and
stores its temperature-softened log-probabilities in a Zarr cache; stage two
(:func:`pipeline.train.train_student`) trains students from that cache without
loading the teacher again.
"""

__version__ = "0.1.0"
