"""Checkpoint conversion between FlexSP and other formats (``flexsp-convert``).

Why a package of its own, above training: conversion reads and writes FlexSP checkpoints through
``training.checkpointing`` and builds the runtime's model to check names and shapes, while
nothing below it (planner, data, runtime, training, flexsp_patches) may depend on conversion or
on ``transformers`` / ``safetensors`` (the ``[hf]`` extra).
"""
