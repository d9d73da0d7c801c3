"""What a table's picture shows (Preview EPD Params and the trainers draw it in nodes/plotting.py): each variant's
registry entry describes its table in one of two forms, so the drawing code never asks which solver a table is for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PointsPicture:
    """Per step i, K points between sigma_i and sigma_{i+1} (the paper's variants, EPD-MS)."""
    heading: str                        # "<heading> table: <describe()>"
    caption: str                        # what the marks mean
    r: torch.Tensor                     # (N, K): how far a point lies from log sigma_i to log sigma_{i+1}
    size: torch.Tensor                  # (N, K) in [0, 1]: the dot's size
    colour: torch.Tensor | None         # (N, K) in [-1, 1]: blue < 0 < red; None: grey
    labels: Callable[[int], list[str]]  # step i -> the text beside it (a line per point, then any extra);
    #                                     a function: a 4096-step table formats only the steps drawn


@dataclass
class MatrixPicture:
    """Per step i, a row of cells: the weights of the directions d_0 .. d_i (DyWeight's W)."""
    heading: str
    caption: str
    matrix: torch.Tensor                # (N, N), lower-triangular
    full_colour: float                  # |value| drawn at full colour (red > 0 > blue)
    labels: Callable[[int], str]        # step i -> the text beside its row
