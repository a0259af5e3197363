"""The calibrate stage: the accuracy-driven search for an INT8 (or int4) Q/DQ graph; imports runtime/ and the
graph toolkit (`export.graph`)."""
