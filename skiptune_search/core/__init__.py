"""The controller core: what ``skiptune_search.apply`` needs, and nothing else of the package.

``schedule`` (the ρ table and its JSON file), ``families`` (how a search's parameters fill it:
the family registry), ``skips`` (a skip's description), ``adapters`` (where each architecture's skips are
made and consumed), ``controller`` (the hooks that scale them), ``freeu`` (FreeU's factors on a
consuming block's input), ``interp`` (interpolation in log σ), ``errors`` (the tool's exceptions)
and ``files`` (checked outputs, atomic writes, bounded and typed reads). Imports torch (and
diffusers' Fourier filter when a FreeU schedule runs, where diffusers is installed: without it,
``freeu.band_filter``, the same computation); never jsonschema, Optuna, torch-fidelity or the CLI.
``RhoSchedule.factors_at(sigma)`` is the one computation of each block's ρ and FreeU factors at a
noise level, which the controller, the ComfyUI node and the UI exports share.
"""
