"""What every frozen model config shares: replace, and JSON both ways with unknown keys refused in one line."""

from __future__ import annotations

import dataclasses
import json

from flax_sgm.errors import CheckpointError


# Every config class by its name, filled as each is defined (all of them once flax_sgm is imported): how a file
# that records a config's class name (a `flax-sgm convert` output) finds the class without importing its family.
CONFIGS: dict[str, type] = {}


class ConfigIO:
    """A mixin for frozen dataclass configs. `NAME` says what the config describes in messages."""

    NAME = "model"
    OPTIONS: tuple[str, ...] = ()  # flax_sgm's own fields, which a loader may set; the checkpoint says the rest

    @classmethod
    def check_options(cls, options, source: str) -> None:
        """A loader's `options`: only OPTIONS, each refused in one line otherwise (a raw TypeError before)."""
        for name in options:
            if name not in cls.OPTIONS:
                known = name in {f.name for f in dataclasses.fields(cls)}
                why = "the checkpoint says it" if known else f"not a {cls.__name__} field"
                raise CheckpointError(f"{source}: {name}= cannot be set here ({why}); a loader sets only "
                                      f"{', '.join(cls.OPTIONS) or 'nothing of the config'}")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIGS[cls.__name__] = cls

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def unknown_keys_hint(cls, unknown: list[str]) -> str:
        """More to say about keys the config does not know (a subclass names the seed's names, say)."""
        return ""

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config"):
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a {cls.NAME} config must be a JSON object; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.NAME} config keys {unknown}{cls.unknown_keys_hint(unknown)}; "
                             f"known: {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:  # a required key missing, a bad value
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "config"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        return cls.from_dict(d, source=source)
