"""Meta-training for learnedopt (installed as ``learnedopt.training``)."""
