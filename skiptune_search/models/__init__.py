"""Models as denoisers D(x, σ): ``loaders`` (a name, folder, pipeline or pickle to a denoiser and
its facts, offline), ``denoisers`` (EDM preconditioning, diffusers VP models), ``prompts``."""
