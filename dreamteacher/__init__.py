"""dreamteacher: a lean, throughput-first framework for DreamTeacher-style generative pretraining."""

__version__ = "0.1.0"
