"""Models as denoisers D(x, σ): ``source`` (the model source and the registered model kinds,
each of which loads its sources), ``loaders`` (model folders, EDM/EDM2 pickles), ``pipelines``
(diffusers), ``edm2``, ``uvit``, ``denoisers`` (EDM preconditioning, diffusers VP models),
``prompts``."""
