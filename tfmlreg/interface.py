"""The names of the exported interface, defined once (docs/DESIGN.md section 4).

An exported SavedModel (:mod:`tfmlreg.export`), the TF Serving client (:mod:`tfmlreg.serving`),
the predictors (:mod:`tfmlreg.inference`) and the tests all speak these names; a server or a
C++ program finds the signatures and tensors by them. Importing this module imports nothing else.
"""

SIGNATURE = "serving_default"  # the network alone (what TF Serving runs by default)
REFINED_SIGNATURE = "register_refined"  # the network, then refinement steps in-graph
SIGNATURES = (SIGNATURE, REFINED_SIGNATURE)
INPUTS = ("fixed", "moving", "spacing")  # (B, D, H, W, 1) HU, (B, D, H, W, 1) HU, (B, 3) mm
OUTPUTS = ("displacement", "warped")  # (B, D, H, W, 3) mm, (B, D, H, W, 1) HU
