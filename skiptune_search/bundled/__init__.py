"""The bundled Fashion-MNIST model: its data (``data``), training (``training``) and model card
(``card``); its weights and reference statistics are in ``skiptune_search/assets``."""
