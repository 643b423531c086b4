"""The sprite world: a procedural picture world small enough to train on a 2-core CPU.

Every rendered image comes with its ground truth (the classes, colour schemes and positions of its
sprites), so identity, confusion between look-alike concepts and drift of the base model can be
measured in pictures. This package is pure torch and PIL: it never imports ComfyUI.
"""
