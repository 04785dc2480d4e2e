"""CT conventions, defined once: Hounsfield units, the intensity windows and the lung lobes.

Every module that needs one of these imports it from here (the model's intensity window, the
air that fills what a moving scan does not cover, the phantom's tissues, the lobe labels of
label maps and reports). Importing this module imports nothing else.
"""

AIR_HU = -1000.0  # air; also what the moving image holds outside its field of view
PARENCHYMA_HU = -850.0  # inflated lung parenchyma
SOFT_TISSUE_HU = 40.0

# The network's intensity window (HU -> [0, 1], part of the model): air to soft tissue, so the
# lungs and their vessels use the range; below it maps to 0, the fill of warped-out points.
HU_WINDOW = (AIR_HU, 200.0)
DISPLAY_WINDOW = HU_WINDOW  # figures show the intensities as the network sees them

# Label maps hold the five lung lobes (0 is background), as the phantom and COPDGene do.
LOBE_LABELS = {"LUL": 1, "LLL": 2, "RUL": 3, "RML": 4, "RLL": 5}
LOBE_NAMES = {label: name for name, label in LOBE_LABELS.items()}
NUM_LABELS = len(LOBE_LABELS)
