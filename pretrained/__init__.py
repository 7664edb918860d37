"""Shipped pretrained optimizers, one folder each (installed as ``learnedopt.pretrained``)."""
