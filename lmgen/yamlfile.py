"""The YAML files a user hands lmgen — experiments, presets, sweeps — read so that anything
wrong with one is a single line naming the file (and the line and column where YAML knows
them), never a traceback and never a hang: binary or oversized files, bytes that are not
UTF-8, syntax errors, duplicate keys, tags (``!!python/object``: nothing is constructed but
plain data), recursive aliases, alias bombs ("billion laughs": OmegaConf's node limit), and
documents that are not a mapping.
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

MAX_YAML_BYTES = 2**20  # experiment, preset and sweep files are a few kB of text: past 1 MiB it is the wrong file


class YamlFileError(ValueError):
    """A file that is not a readable YAML mapping; the message names it (``lmgen.config`` makes it a ConfigError)."""


def read_mapping(path: str | Path, what: str) -> DictConfig:
    """The YAML mapping in the file at ``path``. YamlFileError naming the path (and its line and
    column where YAML knows them) for anything else: a file past ``MAX_YAML_BYTES`` or holding
    NUL bytes (binary), bytes that are not UTF-8, a syntax error, a duplicate key, a tag such as
    ``!!python/object`` (OmegaConf constructs none), a recursive alias, aliases expanding past
    OmegaConf's node limit (a "billion laughs"), or a document that is not a mapping (``what``
    says what it should be)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= MAX_YAML_BYTES else b""
    except OSError as err:
        raise YamlFileError(f"{path}: cannot read it ({err.strerror or err})") from None
    if size > MAX_YAML_BYTES or b"\0" in data:
        raise YamlFileError(f"{path}: a binary or oversized file ({size} bytes), not a YAML text file; {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise YamlFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, nothing constructed
        if node is not None and not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {text.strip()[:40]!r}"
            raise YamlFileError(f"{path}: {what}; got {kind}")
        return OmegaConf.load(io.StringIO(text))  # type: ignore[return-value]
    except yaml.YAMLError as err:
        raise YamlFileError(f"{path}{_yaml_where(err)}: {_yaml_problem(err)}") from None


def _yaml_where(err: yaml.YAMLError) -> str:
    """``:line:column`` of a YAML error (1-based), or "" where it has no position."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML error says went wrong, on one line (OmegaConf's alias-limit hint left out)."""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{problem} ({context})" if context and context not in problem else problem
    text = " ".join(text.split()).split(" See https://")[0]
    if "expansion exceeds" in text:
        text += " (aliases that expand to ever more nodes, a 'billion laughs'?)"
    return text if text.startswith("YAML") else f"YAML: {text}"
