"""Loading a run configuration: YAML file, then ``--section.key=value`` flags, over the
schema's defaults (launcher/config/schema.py); printing it back; and handing it to the runtime.

Precedence, highest first::

    --section.key=value   (or --section.key value)  on the command line
    --config PATH          a YAML file shaped like configs/smollm2-135m.yaml
    the model's defaults   its generation_config.json (``model_defaults``; model.generation_config)
    dataclass defaults     launcher/config/schema.py

    cfg = load_config(["--config", "configs/smollm2-135m.yaml", "--pipeline.stages=3"])
"""

import dataclasses
import difflib
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from .schema import (
    _SECTIONS,
    ConfigError,
    RunConfig,
    SamplingConfig,
    _example,
    _invalid,
    _type_name,
    field_docs,
)

# ---------------------------------------------------------------------- loading


def _did_you_mean(word: str, candidates: Sequence[str], fmt: str = "`{}`") -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    if close:
        return "did you mean " + fmt.format(close[0]) + "?"
    return "valid choices: " + ", ".join(fmt.format(c) for c in candidates)


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _field_type(section: str, key: str) -> Any:
    return {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}[key]


def _read_yaml(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file `{path}` not found (looked in {p.resolve()}); "
            "pass an existing YAML file with --config, e.g. `--config configs/smollm2-135m.yaml`"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file `{path}` is not valid YAML: {e}") from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file `{path}` must be a mapping of sections ({', '.join(_SECTIONS)}), "
            f"got a {type(data).__name__}; see configs/smollm2-135m.yaml for the layout"
        )
    out: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"unknown key `{section}` in {path}; {_did_you_mean(str(section), list(_SECTIONS))}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(
                f"section `{section}` in {path} must be a mapping of keys to values, got {body!r}; "
                f"write e.g. `{section}:` followed by indented `key: value` lines"
            )
        keys = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        for key in body:
            if key not in keys:
                raise ConfigError(
                    f"unknown key `{section}.{key}` in {path}; "
                    + _did_you_mean(str(key), keys, fmt=f"`{section}.{{}}`")
                )
        out[section] = dict(body)
    return out


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _parse_cli_value(key: str, tp: Any, raw: str) -> Any:
    """Turn the text after `--key=` into a value of the field's type."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError
        if tp is int:
            return int(raw, 10)
        if tp is float:
            return float(raw)
        if origin is list:
            if raw.strip().startswith("["):
                value = yaml.safe_load(raw)  # a YAML flow list: `[10, 20]`, `["\n", "a,b"]`
                if not isinstance(value, list):
                    raise ValueError
                return value
            if raw.strip() == "":
                return []
            (item_tp,) = typing.get_args(tp)
            # Comma-separated items are taken verbatim for strings; use a flow list for commas or escapes.
            if item_tp is int:
                return [int(x, 10) for x in raw.split(",")]
            return [float(x) for x in raw.split(",")] if item_tp is float else raw.split(",")
    except (ValueError, yaml.YAMLError):
        raise _invalid(key, raw, _type_name(tp), f"write it like {_example(key, tp)}") from None
    return raw  # str and Literal: checked by the section's __post_init__


def _parse_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str, str, str]]]:
    """Split argv into the --config path and `(section, key, raw value, flag)` overrides."""
    config_path: str | None = None
    overrides: list[tuple[str, str, str, str]] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument `{arg}`: config overrides take the form `--section.key=value` "
                "(e.g. `--pipeline.stages=2`), and a file is given with `--config PATH`"
            )
        name, eq, raw = arg[2:].partition("=")
        if name == "config" or "." in name:
            if not eq:
                is_bool = "." in name and _known(name) and _field_type(*name.split(".")) is bool
                if i < len(items) and not items[i].startswith("--"):
                    raw = items[i]
                    i += 1
                elif is_bool:
                    raw = "true"  # a bare boolean flag, e.g. `--decoding.chat`
                else:
                    raise ConfigError(f"`--{name}` needs a value: write `--{name}=VALUE` or `--{name} VALUE`")
        if name == "config":
            if config_path is not None:
                raise ConfigError(
                    f"--config given twice (`{config_path}` and `{raw}`); pass one file and "
                    "override single keys with `--section.key=value`"
                )
            config_path = raw
            continue
        if "." not in name:
            close = difflib.get_close_matches(name, [k.split(".")[1] for k in _all_keys()], n=1)
            hint = "".join(f"; did you mean `--{k}`?" for k in _all_keys() if close and k.endswith("." + close[0]))
            raise ConfigError(
                f"unknown argument `{arg}`: config overrides take the form `--section.key=value`{hint}"
            )
        if not _known(name):
            raise ConfigError(f"unknown option `--{name}` on the command line; {_cli_suggestion(name)}")
        section, key = name.split(".")
        overrides.append((section, key, raw, f"--{name}"))
    return config_path, overrides


def _known(dotted: str) -> bool:
    return dotted in _all_keys()


def _cli_suggestion(dotted: str) -> str:
    section, _, key = dotted.partition(".")
    if section in _SECTIONS and "." not in key:
        keys = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if difflib.get_close_matches(key, keys, n=1):
            return _did_you_mean(key, keys, fmt=f"`--{section}.{{}}`")
    # The key may exist in another section (`--model.stages`) or the section be misspelt.
    same_key = [k for k in _all_keys() if k.split(".")[1] == key]
    if same_key:
        return f"did you mean `--{same_key[0]}`?"
    return _did_you_mean(dotted, _all_keys(), fmt="`--{}`")


# what a model contributes below the YAML: (where it comes from, {section: {key: value}})
ModelDefaults = Callable[[RunConfig], tuple[str, dict[str, dict[str, Any]]]]


def load_config(
    argv: Sequence[str] = (), *, defaults_file: str | None = None, model_defaults: ModelDefaults | None = None
) -> RunConfig:
    """Build the RunConfig from dataclass defaults, a YAML file and `--section.key=value` overrides.

    argv holds only config arguments: `--config PATH` / `--config=PATH` and
    `--section.key=value` / `--section.key value` (a bare boolean flag means
    true). `defaults_file`, if given, is the YAML read when argv has no
    `--config`. `model_defaults(cfg)`, if given, returns the model's own defaults
    (its generation_config.json: launcher/launch.py, ``generation_config_defaults``),
    which fill every key that neither the YAML nor the command line set. Raises
    ConfigError for anything else.
    """
    if isinstance(argv, str):
        raise TypeError("load_config takes a list of arguments, not a string")
    config_path, overrides = _parse_argv(argv)
    path = config_path if config_path is not None else defaults_file

    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    origin: dict[str, str] = {}  # dotted key -> where it was set, for error messages
    if path is not None:
        for section, body in _read_yaml(path).items():
            values[section].update(body)
            origin.update({f"{section}.{k}": f"in {path}" for k in body})

    def where(e: ConfigError) -> ConfigError:
        src = origin.get(e.key or "")
        return ConfigError(f"{e} (set {src})", key=e.key) if src else e

    try:
        for section, key, raw, flag in overrides:
            dotted = f"{section}.{key}"
            origin[dotted] = f"on the command line by `{flag}`"
            values[section][key] = _parse_cli_value(dotted, _field_type(section, key), raw)
        sections = {s: cls(**values[s]) for s, cls in _SECTIONS.items()}
        cfg = RunConfig(**sections)
        if model_defaults is None:
            return cfg
        source, layer = model_defaults(cfg)
        unset = [(s, k, v) for s, body in layer.items() for k, v in body.items() if f"{s}.{k}" not in origin]
        if not unset:
            return cfg
        for section, key, value in unset:
            values[section][key] = value
            origin[f"{section}.{key}"] = f"by {source}"
        return RunConfig(**{s: cls(**values[s]) for s, cls in _SECTIONS.items()})
    except ConfigError as e:
        raise where(e) from None


# ------------------------------------------------------------------- printing


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts and lists (a deep copy)."""
    return dataclasses.asdict(cfg)


def _yaml_scalar(value: Any, in_list: bool = False) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v, in_list=True) for v in value) + "]"
    if isinstance(value, str):
        text = yaml.safe_dump(value, width=sys.maxsize).removesuffix("\n...\n").removesuffix("\n")
        if in_list or "\n" in text:
            return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar
        return text
    return yaml.safe_dump(value).removesuffix("\n...\n").removesuffix("\n")


def dump_yaml(cfg: RunConfig, *, comments: bool = False) -> str:
    """The config as YAML that `--config` reads back; `comments` adds each field's docstring."""
    docs = field_docs() if comments else {}
    lines: list[str] = []
    as_dict = config_to_dict(cfg)
    if as_dict["serve"]["api_key"]:  # never printed: a printed config ends up in logs
        as_dict["serve"]["api_key"] = "<redacted: set it again with ADADECODE_API_KEY>"
    for section, body in as_dict.items():
        if lines:
            lines.append("")
        if section in docs:
            lines.append(f"# {docs[section]}")
        lines.append(f"{section}:")
        for key, value in body.items():
            if f"{section}.{key}" in docs:
                lines.append(f"  # {docs[f'{section}.{key}']}")
            lines.append(f"  {key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(typing.get_args(tp)) + "}"
    if origin is list:
        item = _metavar(typing.get_args(tp)[0])
        return f"{item},{item},..."
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[tp]


def config_help() -> str:
    """Every `--section.key` with its type, default and docstring, for `--help`."""
    docs = field_docs()
    defaults = config_to_dict(RunConfig())
    lines = [
        "config options (precedence: --section.key=value > --config FILE > defaults):",
        "  --config PATH  YAML file with the sections below, e.g. configs/smollm2-135m.yaml",
    ]
    for section, cls in _SECTIONS.items():
        lines.append("")
        lines.append(f"{section}: {docs.get(section, '')}".rstrip())
        for f in dataclasses.fields(cls):
            default = _yaml_scalar(defaults[section][f.name])
            lines.append(f"  --{section}.{f.name} {_metavar(f.type)}  (default: {default})")
            if f"{section}.{f.name}" in docs:
                lines.append(f"      {docs[f'{section}.{f.name}']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- to the runtime


def load_spec(cfg: RunConfig, *, serving: bool = False):
    """The runtime's ``LoadSpec`` from the model, pipeline and decoding sections.

    ``serving`` (`adadecode serve`): every stage gets ``serve.max_num_seqs`` KV cache slots;
    otherwise one (a CLI generation decodes one sequence at a time).
    """
    from adadecode.runtime.loading import LoadSpec

    m, p, d = cfg.model, cfg.pipeline, cfg.decoding
    return LoadSpec(
        m.source, stages=p.stages, split_points=p.split_points, device=m.device, dtype=m.dtype,
        max_seq_len=m.max_seq_len, cache_dir=m.cache_dir or None, revision=m.revision or None, heads=d.heads,
        exit_layers=d.exit_layers, thresholds=d.thresholds, compile=p.compile, max_inflight=d.max_inflight,
        lookup=d.lookup, draft=d.draft, draft_table=None if d.draft_table == "none" else d.draft_table,
        row_invariant=p.row_invariant, compile_warmup=p.compile_warmup,
        auto_heads_for=d.early_exit if d.auto_heads else None,
        num_slots=cfg.serve.max_num_seqs if serving else 1, batching=cfg.serve.batching,
        generation_config=m.generation_config,
    )


def sampling_params(sampling: SamplingConfig):
    """The runtime's ``SamplingParams`` from the sampling section (None: greedy)."""
    from adadecode.runtime.params import SamplingParams

    if sampling.temperature == 0:
        return None
    return SamplingParams(**dataclasses.asdict(sampling))
