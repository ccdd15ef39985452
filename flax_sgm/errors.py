"""The errors flax_sgm raises for bad checkpoints, each said so a user can act on it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A problem with a checkpoint's files or keys, said in one line."""


class AbstractModelError(TypeError):
    """A model of shapes only (flax_sgm.models.abstract) called before weights were put in it."""

    def __init__(self, what: str):
        super().__init__(f"the model is abstract (flax_sgm.models.abstract: shapes only; {what} holds no weights): "
                         "load weights into it (convert.load_torch_state_dict, convert.load_planned) or build it with "
                         "models.build before calling it")


class ConversionError(ValueError):
    """Every problem of one conversion, listed at once."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), context: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.head = f"weight conversion failed{context}"
        lines = [self.head + ":"]
        lines += [f"  missing key: {k}" for k in self.missing]
        lines += [f"  unexpected key: {k}" for k in self.unexpected]
        lines += [f"  {m}" for m in self.mismatched]
        super().__init__("\n".join(lines))

    def one_line(self, shown: int = 2) -> str:
        """The problems counted, the first of each kind named (the command line's error; str() lists them all)."""
        parts = []
        for kind, items in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > shown else ""
                parts.append(f"{len(items)} {kind}: " + ", ".join(items[:shown]) + more)
        return f"{self.head}: " + "; ".join(parts)


def first_line(err: BaseException) -> str:
    """An error's first line, for a one-line CheckpointError (its type's name when it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
