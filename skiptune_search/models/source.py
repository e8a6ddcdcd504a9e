"""The model source: which model a run loads and what the user allowed for it, built once from
the options and passed whole; and the model kinds, registered here, each of which recognizes its
sources, lists the files it reads and loads them.

>>> source = ModelSource("edm-cifar10-32x32-uncond-vp.pkl", trust_pickle=True,
...                      checkouts={"edm": "edm"})                                  # doctest: +SKIP
>>> denoiser, info = source.load()                                                  # doctest: +SKIP

A ``ModelSource`` is frozen and JSON-able (``to_dict``/``from_dict``): a search's worker
processes get it whole in their job. Trust (``trust_pickle``) and checkouts (code the loader
runs) come from the command line or the caller, never from a file.

A new kind of model is a ``ModelKind`` (its ``recognizes``, ``load`` and, where it reads more
than the model's path or runs a checkout, ``inputs`` and ``checkouts``) given to
``register_model_kind``; the built-in kinds are registered at the end of this module
(docs/extending.md, "A model kind"). Kinds are tried newest first, so a registered kind goes
before the built-in ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..bundled import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from ..core.errors import InputError, ModelLoadError


@dataclass(frozen=True)
class ModelSource:
    """A model by name or path, and what its loader may use: ``trust_pickle`` (consent to run a
    pickle's code), ``checkouts`` (code base name -> folder, the names of ``known_checkouts``:
    'edm' for NVlabs/edm or edm2, 'uvit' for baofff/U-ViT), ``config`` (a checkpoint's config by
    name in its checkout) and ``kind`` (the registered kind that loads it; None: the first that
    recognizes it)."""

    model: str = DEFAULT_MODEL_NAME
    trust_pickle: bool = False
    checkouts: Mapping[str, str] = field(default_factory=dict)
    config: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        model = DEFAULT_MODEL_NAME if self.model is None else self.model
        if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
            raise InputError(f"model = {model!r} is not a model name or path: name one (e.g. {DEFAULT_MODEL_NAME})",
                             option="model")
        if not isinstance(self.trust_pickle, bool):
            raise InputError(f"trust_pickle = {self.trust_pickle!r} is not True or False", option="trust_pickle")
        if not isinstance(self.checkouts, Mapping):
            raise InputError(f"checkouts = {self.checkouts!r} is not a mapping of code base to folder",
                             option="checkouts")
        checkouts = {}
        for name, path in self.checkouts.items():
            if path is None:
                continue
            if not isinstance(name, str) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
                what = known_checkouts().get(name, name)
                raise InputError(f"{path!r} is not the path of a checkout of the {what} code: give its folder, or "
                                 f"leave it out", option=f"{name}_path")
            checkouts[name] = os.fspath(path)
        for name, value in (("config", self.config), ("kind", self.kind)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"{name} = {value!r} is not a name", option=name)
        object.__setattr__(self, "model", os.fspath(model))
        object.__setattr__(self, "checkouts", dict(sorted(checkouts.items())))

    def __hash__(self) -> int:
        return hash((self.model, self.trust_pickle, tuple(self.checkouts.items()), self.config, self.kind))

    def checkout(self, name: str) -> str | None:
        """The folder of code base ``name`` the user gave, or None."""
        return self.checkouts.get(name)

    def to_dict(self) -> dict:
        return {"model": self.model, "trust_pickle": self.trust_pickle, "checkouts": dict(self.checkouts),
                "config": self.config, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSource":
        return cls(**data)

    # --- through its kind ---------------------------------------------------------------------
    def model_kind(self) -> "ModelKind":
        """The kind that loads this source: the one it names, else the newest registered kind that
        recognizes it."""
        if self.kind is not None:
            for kind in _KINDS:
                if kind.name == self.kind:
                    return kind
            raise ModelLoadError(f"model kind {self.kind!r} is not registered in this process (a kind registered "
                                 f"from Python is known to that process alone): register it here, or run the search "
                                 f"with one worker", option="model")
        for kind in _KINDS:
            if kind.recognizes(self):
                return kind
        whats = [kind.what for kind in reversed(_KINDS)]
        raise ModelLoadError(f"model {self.model} not found: use {', '.join(whats[:-1])}, or {whats[-1]}",
                             option="model")

    def for_workers(self) -> "ModelSource":
        """This source with its kind named, for worker processes (``search.workers``): they know
        the built-in kinds alone, so a kind registered from Python is refused here, before any
        worker starts."""
        kind = self.model_kind().name
        if kind not in BUILT_IN_KINDS:
            raise InputError(f"model kind {kind!r} was registered in this process, and worker processes know only "
                             f"the built-in kinds ({', '.join(BUILT_IN_KINDS)}): use one worker", option="workers")
        return ModelSource(**{**self.to_dict(), "kind": kind})

    def load(self):
        """The denoiser D(x, σ) of the model and its info (name, resolution, channels, σ range)."""
        return self.model_kind().load(self)

    def network(self):
        """The network whose skips ``inspect`` lists (a pipeline's UNet, without the rest)."""
        return self.model_kind().network(self)

    def inputs(self) -> list[tuple[str, Path | str]]:
        """What loading the model reads, as (what, path) pairs for the output guard
        (``core.files.check_output``): the model's files and the checkouts given."""
        kind = next((k for k in _KINDS if k.name == self.kind or self.kind is None and k.recognizes(self)), None)
        pairs = kind.inputs(self) if kind is not None else [("the model folder", self.model)]
        known = known_checkouts()
        pairs += [(f"the {known.get(name, name)} checkout", path) for name, path in self.checkouts.items()]
        return [(what, p) for what, p in pairs if p is not None and (p == DEFAULT_MODEL_DIR or Path(p).exists())]


class ModelKind:
    """One kind of model: ``name`` (short, unique), ``what`` (how an error lists it),
    ``recognizes(source)`` (cheap: names and files, nothing loaded), ``load(source)`` (the
    denoiser D(x, σ) with its info: name, resolution, channels, sigma_min, sigma_max, and
    label_dim for a class-conditional model), and, where they differ from the defaults,
    ``inputs(source)`` (the files it reads), ``network(source)`` and ``checkouts`` (the code bases
    its loader may run, name -> how messages name them: ``source.checkout(name)``, given by the
    user as ``--checkout NAME=PATH``). Loading may run code only with the consent the source
    carries (``trust_pickle``, a checkout)."""

    name = "?"
    what = "?"
    checkouts: Mapping[str, str] = {}

    def recognizes(self, source: ModelSource) -> bool:
        raise NotImplementedError

    def load(self, source: ModelSource):
        raise NotImplementedError

    def network(self, source: ModelSource):
        return self.load(source)[0]

    def inputs(self, source: ModelSource) -> list[tuple[str, Path | str]]:
        return [("the model file", source.model)]


_KINDS: list[ModelKind] = []  # newest first


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Make ``kind`` known to every loader of this process, before the kinds registered earlier
    (one of the same name is replaced). Returns it."""
    if not isinstance(kind, ModelKind) or not isinstance(kind.name, str) or not kind.name:
        raise InputError(f"{kind!r} is not a ModelKind with a name", option="kind")
    if not isinstance(kind.checkouts, Mapping) or not all(
            isinstance(n, str) and n and "=" not in n and isinstance(w, str) and w for n, w in kind.checkouts.items()):
        raise InputError(f"model kind {kind.name!r}: checkouts = {kind.checkouts!r} is not a mapping of code base "
                         f"names (no '=') to how messages name them, e.g. {{'edm': 'EDM'}}", option="kind")
    unregister_model_kind(kind.name)
    _KINDS.insert(0, kind)
    return kind


def unregister_model_kind(name: str) -> None:
    _KINDS[:] = [k for k in _KINDS if k.name != name]


def model_kinds() -> list[str]:
    """The registered kinds' names, in the order they are tried."""
    return [k.name for k in _KINDS]


def known_checkouts() -> dict[str, str]:
    """The code bases the registered kinds may run (their ``checkouts``), name -> how messages
    name them, sorted by name."""
    return dict(sorted({name: what for kind in _KINDS for name, what in kind.checkouts.items()}.items()))


def load_denoiser(model: str | os.PathLike | None = None, trust_pickle: bool = False,
                  edm_path: str | os.PathLike | None = None, uvit_path: str | os.PathLike | None = None,
                  uvit_config: str | None = None):
    """The denoiser of ``model`` and its info: ``ModelSource(model, trust_pickle, {"edm": edm_path,
    "uvit": uvit_path}, uvit_config).load()``."""
    return ModelSource(model, trust_pickle, {"edm": edm_path, "uvit": uvit_path}, uvit_config).load()


# --- the built-in kinds (tried last to first: the model folder is the fallback) ------------------------
class ModelFolder(ModelKind):
    name, what = "folder", f"{DEFAULT_MODEL_NAME} (bundled), a model folder written by 'skiptune-search train-default'"

    def recognizes(self, source):
        return source.model == DEFAULT_MODEL_NAME or Path(source.model).is_dir()

    def load(self, source):
        from .loaders import load_model_folder

        return load_model_folder(DEFAULT_MODEL_DIR if source.model == DEFAULT_MODEL_NAME else Path(source.model))

    def inputs(self, source):
        return [("the model folder", DEFAULT_MODEL_DIR if source.model == DEFAULT_MODEL_NAME else source.model)]


class Pipeline(ModelKind):
    name, what = "pipeline", "a diffusers pipeline"

    def recognizes(self, source):
        from .pipelines import is_pipeline_source

        return is_pipeline_source(source.model)

    def load(self, source):  # its UNet in σ-space (a scheduler's sampling is models.pipelines.PipelineRun)
        from .pipelines import load_vp_denoiser

        return load_vp_denoiser(source.model)

    def network(self, source):
        from .pipelines import load_pipeline_unet

        return load_pipeline_unet(source.model)

    def inputs(self, source):
        return [("the model folder", source.model)]


class UViT(ModelKind):
    name, what = "uvit", "a U-ViT .pth"
    checkouts = {"uvit": "U-ViT"}

    def recognizes(self, source):
        return source.checkout("uvit") is not None or source.model.endswith(".pth")

    def load(self, source):
        from .uvit import load_uvit

        return load_uvit(source.model, source.checkout("uvit"), source.config)


class EDMPickle(ModelKind):
    name, what = "edm-pickle", "an EDM or EDM2 .pkl (trusted)"
    checkouts = {"edm": "EDM"}

    def recognizes(self, source):
        return source.model != DEFAULT_MODEL_NAME and source.model.endswith(".pkl")

    def load(self, source):
        from .loaders import load_edm_pickle

        return load_edm_pickle(Path(source.model), source.trust_pickle, source.checkout("edm"))


for _kind in (ModelFolder(), Pipeline(), UViT(), EDMPickle()):
    register_model_kind(_kind)
BUILT_IN_KINDS = tuple(reversed(model_kinds()))

__all__ = ["ModelKind", "ModelSource", "known_checkouts", "load_denoiser", "model_kinds", "register_model_kind",
           "unregister_model_kind"]
