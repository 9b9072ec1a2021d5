"""Inputs typed on the command line (``--smiles``, ``--sequence``), shared by predict and explain."""

from __future__ import annotations

from typing import Any

from meddx.errors import ConfigError

__all__ = ["check_flags", "inline_inputs", "one_input"]



def check_flags(card: Any, smiles: Any, sequence: Any) -> None:
    """Refuse ``--smiles`` / ``--sequence`` for a model whose modality does not take text typed
    with that flag (its ``Modality.inline_flag``; ``CCGT`` is both a SMILES and DNA, and a reader
    would take the wrong one without a word).

    Raises:
        ConfigError: a flag the model's modality does not read.
    """
    from meddx.modalities import MODALITIES, get_modality

    takes = get_modality(card.modality).inline_flag
    for flag, values in (("--smiles", smiles), ("--sequence", sequence)):
        if values and takes != flag:
            owners = [n for n in MODALITIES.names()
                      if getattr(MODALITIES.get(n), "inline_flag", None) == flag]
            raise ConfigError(f"{flag} is for {' / '.join(owners)} models; '{card.name}' is a "
                              f"{card.modality} model",
                              hint="give its input as a file argument instead")


def inline_inputs(card: Any, smiles: list[str] | None, sequence: list[str] | None) -> list[str]:
    """The SMILES and DNA strings given with ``--smiles`` / ``--sequence``, in that order, for
    ``predictor.read`` (after :func:`check_flags`)."""
    check_flags(card, smiles, sequence)
    return [*(smiles or []), *(sequence or [])]


def one_input(source: str | None, smiles: str | None, sequence: str | None) -> str:
    """Exactly one of a positional SOURCE, ``--smiles`` or ``--sequence`` (explain takes one).

    Raises:
        ConfigError: none or several given.
    """
    given = [(name, value) for name, value in (("SOURCE", source), ("--smiles", smiles),
                                               ("--sequence", sequence)) if value is not None]
    if len(given) != 1:
        what = "none was given" if not given else "got " + " and ".join(n for n, _ in given)
        raise ConfigError(f"give exactly one input to explain: SOURCE, --smiles or --sequence; "
                          f"{what}", hint="e.g. meddx explain runs/tox21/model --smiles 'CCO' "
                          "--out atoms.png")
    return given[0][1]
