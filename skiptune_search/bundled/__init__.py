"""The bundled Fashion-MNIST model: its constants here (one home: the model's name and folder,
its record file, the reference statistics, the data set it was trained on), its data
(``data``), training (``training``) and model card (``card``); its weights and reference
statistics are in ``skiptune_search/assets``.

This module and ``data`` import only the core: models and scoring read them. ``training`` and
``card`` train and score the model, above scoring (tests/test_layout.py holds both places).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_NAME = "fashion-mnist-edm"
DEFAULT_MODEL_DIR = ASSETS / DEFAULT_MODEL_NAME
DEFAULT_REFERENCE = ASSETS / "fashion-mnist-test.efficientnet-lite0.npz"  # its EfficientNet-Lite0 statistics
MODEL_INFO_FILE = "skiptune_model.json"  # a model folder's record (preconditioning, σ range, training)
FASHION_MNIST = "fashion-mnist"  # the data set of the bundled model, as a model record names it
