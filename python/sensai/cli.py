"""The ``sensai`` command: ``sensai serve`` runs a teacher server, ``sensai info`` asks one
for its configuration.

Flags are validated before any model loads. ``sensai serve`` prints one line to stdout when
it is ready, the address to pass to ``sensai.Client``; logs go to stderr. SIGINT and SIGTERM
stop it cleanly: no new requests are taken, those in flight are answered, the transport's
files are removed, and it exits 0. A signal before it serves (while the model loads) ends the
load at once, removes the files and exits 128 + the signal's number (130 for Ctrl-C).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from typing import Any

import click

from . import _core
from .protocol import FORMATS, INFO_TAG, SamplingParams, decode_info

__all__ = ["main", "cli", "serve", "info", "record"]

log = logging.getLogger("sensai.cli")

TRANSPORTS = ("named_pipe", "shared_memory", "unix_socket")
#: --transport also takes the address schemes (shm, unix, pipe).
_SCHEME_KINDS = {"shm": "shared_memory", "unix": "unix_socket", "pipe": "named_pipe"}
_TMP = tempfile.gettempdir()
_DEFAULT_PATHS = {
    "named_pipe": f"{_TMP}/sensai-PID-pipes",
    "shared_memory": "/dev/shm/sensai-PID"
    if os.path.isdir("/dev/shm")
    else f"{_TMP}/sensai-PID.shm",
    "unix_socket": f"{_TMP}/sensai-PID.sock",
}
DEVICES_HELP = "cpu, cuda, cuda:N, mps or auto"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?", re.IGNORECASE)
_PATH_FLAG = {"named_pipe": "pipe_dir", "shared_memory": "shm_path", "unix_socket": "socket_path"}
#: --max-elems (elements per tensor) -> bytes per message: 8-byte elements, max_tensors tensors.
_ELEM_BYTES = 8


def _sampling_param(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A sampling flag, checked by `SamplingParams` (the teacher's and sampler's rules)."""
    try:
        SamplingParams.check(str(param.name), value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


class ByteSize(click.ParamType):
    """A size in bytes: ``4096``, or a number with K, M, G or T (powers of 1024), optionally
    followed by ``iB``: ``16M``, ``1GiB``, ``1.5G``."""

    name = "size"
    _UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    _RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(ib)?)?\s*", re.IGNORECASE)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            n = value
        else:
            m = self._RE.fullmatch(str(value))
            if m is None:
                self.fail(
                    f"{value!r} is not a size; expected bytes (4096) or a number with K, M, G or "
                    "T (powers of 1024), optionally followed by iB: 16M, 1GiB",
                    param,
                    ctx,
                )
            n = int(float(m.group(1)) * self._UNITS[(m.group(2) or "").lower()])
        if n < 1:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return n


def _cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver), without importing torch."""
    try:
        lib = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    return count.value


def _device_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device: one of the names the help lists, and present here (torch is not imported)."""
    if _DEVICE_RE.fullmatch(value) is None:
        raise click.BadParameter(f"{value!r} is not a device; expected {DEVICES_HELP}")
    kind, _, index = value.lower().partition(":")
    if kind == "cuda":
        count = _cuda_device_count()
        if count == 0:
            raise click.BadParameter(
                f"{value!r} asks for CUDA, but no CUDA device is present here; "
                f"expected {DEVICES_HELP} (cpu, or auto: CUDA when present)"
            )
        if index and int(index) >= count:
            raise click.BadParameter(
                f"{value!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    if kind == "mps" and sys.platform != "darwin":
        raise click.BadParameter(f"{value!r}: mps (Apple's GPU) is only present on macOS")
    return value.lower()


def _transport_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return _SCHEME_KINDS.get(value, value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    _core.__version__,
    prog_name="sensai",
    message=f"%(prog)s %(version)s (wire protocol {_core.PROTOCOL_VERSION})",
)
def cli() -> None:
    """SensAI: serve a teacher model's (sampled) logits to distillation students over local
    IPC (shared memory, Unix sockets or named pipes)."""


def serve_options(f: Any) -> Any:
    """The flags of ``sensai serve`` (shared with ``python -m sensai.logits_server``)."""
    options = [
        click.option(
            "--model",
            default=None,
            help="Teacher model: a local folder (config.json + weights), a .gguf file, or a "
            "model in the local Hugging Face cache (default: the embedded "
            "SmolLM2-135M-Instruct .gguf). Nothing is downloaded.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            callback=_device_param,
            help=f"{DEVICES_HELP} (auto: CUDA when present, else cpu).",
        ),
        click.option(
            "--transport",
            type=click.Choice(TRANSPORTS + tuple(_SCHEME_KINDS)),
            default="shared_memory",
            show_default=True,
            callback=_transport_param,
            help="How clients reach the server (shm, unix and pipe, the address schemes, "
            "name the same).",
        ),
        click.option(
            "--num-clients",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Slots: how many client connections (processes, DataLoader workers) at once.",
        ),
        click.option(
            "--pipe-dir",
            default=None,
            show_default=_DEFAULT_PATHS["named_pipe"],
            help="named_pipe: the pipes' directory.",
        ),
        click.option(
            "--shm-path",
            default=None,
            show_default=_DEFAULT_PATHS["shared_memory"],
            help="shared_memory: the segment's path (a bare name goes under /dev/shm).",
        ),
        click.option(
            "--socket-path",
            default=None,
            show_default=_DEFAULT_PATHS["unix_socket"],
            help="unix_socket: the socket's path.",
        ),
        click.option(
            "--max-nbytes",
            type=ByteSize(),
            default=None,
            help="Largest message (tensor bytes) in either direction: bytes, or with K, M, G "
            "(powers of 1024): 16M, 1GiB [default: 256 MiB].",
        ),
        click.option(
            "--max-elems",
            type=click.IntRange(min=1),
            default=None,
            help="The seed's older limit, elements per tensor; sets --max-nbytes to "
            f"max_elems * {_ELEM_BYTES} * max_tensors.",
        ),
        click.option(
            "--max-tensors",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Most tensors in one message.",
        ),
        click.option(
            "--max-dims",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Most dimensions of one tensor.",
        ),
        click.option(
            "--interval",
            type=click.FloatRange(min=0),
            default=0.001,
            help="Accepted for the seed's scripts and ignored (the loop is event-driven).",
        ),
        click.option(
            "--num-samples",
            type=int,
            default=256,
            show_default=True,
            help="Samples per position (sampled, coo, compact formats).",
        ),
        click.option(
            "--temperature",
            type=float,
            default=1.0,
            show_default=True,
            callback=_sampling_param,
            help="Sampling temperature (> 0).",
        ),
        click.option(
            "--top-p",
            type=float,
            default=1.0,
            show_default=True,
            callback=_sampling_param,
            help="Nucleus mask before sampling, in (0, 1].",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Top-k mask before sampling (0: none).",
        ),
        click.option(
            "--format",
            "output_format",
            type=click.Choice(FORMATS),
            default="sampled",
            show_default=True,
            help="Output format of every response (see sensai.formats).",
        ),
        click.option(
            "--topk",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="k of the topk format (distinct from --top-k).",
        ),
        click.option(
            "--max-batch-tokens",
            type=click.IntRange(min=1),
            default=16384,
            show_default=True,
            help="Batch requests across clients up to rows * longest sequence tokens; a larger "
            "single request runs alone.",
        ),
        click.option(
            "--batch-wait-ms",
            type=click.FloatRange(0, 10_000),
            default=10.0,
            show_default=True,
            help="Longest wait for clients answered in the previous round before a batch "
            "starts (never more than a fifth of a round's compute time; 0: off).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="CPU threads for the teacher's forward (torch.set_num_threads); default: "
            "torch's choice, every core. Leave cores to a trainer on the same machine.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(0, 2**64 - 1),
            default=None,
            help="Default seed for requests that carry none: each such request then runs "
            "alone in the sampling formats and draws the same random numbers, reproducibly. "
            "For checks, not for training, where every batch needs fresh draws (leave it "
            "unset, or give each request its own seed).",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            default="INFO",
            show_default=True,
            help="Least severe log messages written to stderr.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_flags(kw: dict[str, Any]) -> None:
    """Cross-flag checks click's types cannot express (before any model loads)."""
    try:
        SamplingParams(num_samples=kw["num_samples"]).for_format(kw["output_format"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--num-samples'") from None
    if kw["max_elems"] is not None and kw["max_nbytes"] is not None:
        raise click.UsageError("give --max-nbytes or --max-elems, not both")
    for kind, name in _PATH_FLAG.items():
        if kw[name] is not None and kind != kw["transport"]:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} is for --transport {kind}, not {kw['transport']}")
        if kw[name] is not None and (kind != "shared_memory" or "/" in kw[name]):
            parent = os.path.dirname(os.path.abspath(os.path.expanduser(kw[name])))
            if not os.path.isdir(parent):
                flag = "--" + name.replace("_", "-")
                raise click.BadParameter(f"{parent} is not a directory", param_hint=f"'{flag}'")
    if kw.get("replay") is not None and kw.get("record") is not None:
        raise click.UsageError("give --replay or --record, not both")
    if kw.get("fallback") is not None and kw.get("replay") is None:
        raise click.UsageError("--fallback needs --replay")
    if kw.get("replay") is None:
        from .errors import ModelNotFoundError
        from .teacher.load import resolve_model

        try:
            resolve_model(kw["model"])  # what it names exists; nothing is loaded
        except ModelNotFoundError as e:
            raise click.BadParameter(str(e), param_hint="'--model'") from None


def load_cli_teacher(kw: dict[str, Any]) -> Any:
    """The `TeacherLogitsServer` the teacher flags describe (--threads applied first)."""
    import torch

    from .errors import SensAIError
    from .teacher.model import TeacherLogitsServer

    if kw["threads"] is not None:
        torch.set_num_threads(kw["threads"])
    if not sys.stderr.isatty():  # no progress bars (escape codes) in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return TeacherLogitsServer(
            kw["model"],
            device=kw["device"],
            num_samples=kw["num_samples"],
            temperature=kw["temperature"],
            top_p=kw["top_p"],
            top_k=kw["top_k"],
            output_format=kw["output_format"],
            topk=kw["topk"],
        )
    except (SensAIError, ValueError, OSError) as e:
        raise click.ClickException(f"cannot load the teacher: {e}") from None


def _model_name(kw: dict[str, Any], teacher: Any) -> str:
    reader = getattr(teacher, "reader", None)  # a replayed store names its teacher
    if reader is not None:
        return str(reader.manifest["teacher"]["model"])
    return kw["model"] or "SmolLM2-135M-Instruct (embedded)"


def _serve_teacher(
    kw: dict[str, Any], replay: str | None, record_dir: str | None, fallback: str | None = None
) -> Any:
    """``(teacher, store writer or None)`` for ``sensai serve`` with --replay / --record
    (their combinations checked by `_check_flags`)."""
    if replay is None and record_dir is None:
        return load_cli_teacher(kw), None
    from .errors import SensAIError

    try:
        from .store import StoreReader, StoreWriter
        from .store.record import manifest_for, model_revision
        from .store.serve import RecordingTeacher, ReplayTeacher
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    try:
        if replay is not None:
            reader = StoreReader(replay, fallback=fallback)
            return ReplayTeacher(reader), reader  # closing it publishes what a fallback recorded
        from .teacher.load import resolve_model

        resolved = resolve_model(kw["model"])
        teacher = load_cli_teacher(kw)
        manifest = manifest_for(
            teacher,
            "lossless",
            model=_model_name(kw, teacher),
            revision=model_revision(resolved.path) if resolved.kind != "hub" else None,
            dataset={"source": "sensai serve --record"},
        )
        writer = StoreWriter(record_dir, manifest)  # type: ignore[arg-type]
    except (SensAIError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    return RecordingTeacher(teacher, writer), writer


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _shm_max_nbytes(kw: dict[str, Any], vocab_size: int) -> int:
    """The default --max-nbytes on shared memory: the largest message of the teacher the
    flags describe (`sensai.protocol.max_message_nbytes`)."""
    from .protocol import max_message_nbytes

    return max_message_nbytes(
        kw["output_format"],
        vocab_size,
        kw["max_batch_tokens"],
        num_samples=kw["num_samples"],
        topk=min(kw["topk"], vocab_size),
    )


def _vocab_before_load(model: str | None) -> int | None:
    """The teacher's vocabulary from its config.json, without loading it (a local folder, a
    name in the Hugging Face cache, a .gguf file converted before); None when unknown."""
    try:
        from .teacher.load import _cache_dir_for, model_cache_root, resolve_model

        resolved = resolve_model(model)
        if resolved.kind == "dir":
            config = os.path.join(resolved.path, "config.json")
        elif resolved.kind == "gguf":
            from pathlib import Path

            cache = _cache_dir_for(Path(resolved.path), resolved.name, model_cache_root())
            config = str(cache / "config.json")
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(resolved.path, "config.json")
            if not isinstance(found, str):
                return None
            config = found
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        vocab = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
        return int(vocab) if isinstance(vocab, int) and vocab > 0 else None
    except Exception:  # anything unreadable: size the file after the load instead
        return None


class _Interrupted(BaseException):
    """A signal while the teacher loads (a BaseException: no ``except Exception`` keeps it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Set once `run_serve` has cleaned up: `main` then skips the interpreter's teardown of torch
#: and transformers (about a second or more), which has nothing left to do.
_exit_fast: list[int] = []


def _run(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    _exit_fast.clear()  # a serve run in this process before (a test's) is not this one
    try:
        command.main(args=argv, prog_name=prog_name)
    except SystemExit as e:
        if not _exit_fast:
            raise
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_serve(**kw: Any) -> None:
    """``sensai serve``: validate, open the transport, load the teacher, serve until signalled."""
    _check_flags(kw)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, kw["log_level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .errors import SensAIError
    from .transports import create_transport, format_address, parse_address

    max_nbytes = kw["max_nbytes"]
    if kw["max_elems"] is not None:
        max_nbytes = kw["max_elems"] * _ELEM_BYTES * kw["max_tensors"]
    limits: dict[str, Any] = {"max_tensors": kw["max_tensors"], "max_dims": kw["max_dims"]}
    kind = kw["transport"]
    replay, record_dir = kw.pop("replay", None), kw.pop("record", None)
    # Shared memory reserves every buffer up front: size them from the teacher's largest
    # answer, known before the load when its vocabulary is (else the file is made after it).
    sized = max_nbytes is None and kind == "shared_memory"
    if sized and replay is None:
        vocab = _vocab_before_load(kw["model"])
        if vocab is not None:
            max_nbytes = _shm_max_nbytes(kw, vocab)
    fallback = kw.pop("fallback", None)
    writer: Any = None
    stopping = threading.Event()
    service: Any = None

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: finishing the requests in flight, then exiting", signal.Signals(signum).name)
        stopping.set()
        if service is not None:
            service.stop()

    def while_loading(signum: int, frame: Any) -> None:
        for s in old:  # a second signal during the clean-up below only asks to stop
            signal.signal(s, on_signal)
        raise _Interrupted(signum)

    def open_transport(max_nbytes: int | None) -> tuple[Any, str]:
        extra = {} if max_nbytes is None else {"max_nbytes": max_nbytes}
        try:
            transport, path = create_transport(
                kind, kw[_PATH_FLAG[kind]], num_slots=kw["num_clients"], **limits, **extra
            )
        except (SensAIError, ValueError, OSError) as e:
            raise click.ClickException(f"cannot open the {kind} transport: {e}") from None
        if kind == "shared_memory":
            real = parse_address(format_address(kind, path))[1]  # a bare name is in /dev/shm
            log.info(
                "shared memory: %s reserved in %s (%d slot(s) x 2 rings x %d buffers of "
                "%s%s; --max-nbytes, --num-clients)",
                _mib(os.path.getsize(real)),
                os.path.dirname(real),
                kw["num_clients"],
                transport.ring_depth,
                _mib(transport.limits[2]),
                ", sized for the teacher's largest answer" if sized else "",
            )
        return transport, path

    transport: Any = None
    path = ""
    if not sized or max_nbytes is not None:
        transport, path = open_transport(max_nbytes)
    # Until it serves, a signal ends the load where it is (the main thread runs it); then it
    # only asks the serve loop to stop.
    old = {s: signal.signal(s, while_loading) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from .serving.batching import TeacherService

        log.info("loading the teacher")
        teacher, writer = _serve_teacher(kw, replay, record_dir, fallback)
        if transport is None:
            transport, path = open_transport(_shm_max_nbytes(kw, int(teacher.vocab_size)))
        service = TeacherService(
            teacher,
            transport,
            kw["max_batch_tokens"],
            default_seed=kw["seed"],
            batch_wait=kw["batch_wait_ms"] / 1e3,
            model_name=_model_name(kw, teacher),
        )
        for s in old:
            signal.signal(s, on_signal)
        if stopping.is_set():
            return
        log.info(
            "serving %s (%s, vocab %d) on %s with %d slot(s)",
            service.model_name,
            kw["output_format"],
            teacher.vocab_size,
            path,
            kw["num_clients"],
        )
        click.echo(format_address(kind, path))
        sys.stdout.flush()
        service.serve_forever()
    except _Interrupted as e:
        log.info("%s while loading the teacher: exiting", signal.Signals(e.signum).name)
        _exit_fast.append(128 + e.signum)
    finally:
        if transport is not None:
            transport.close()
        if writer is not None:
            writer.close()  # publish the last recorded shard
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped; removed %s", path)
    if _exit_fast:
        raise SystemExit(_exit_fast[-1])
    _exit_fast.append(0)


@cli.command("serve")
@serve_options
@click.option(
    "--replay",
    default=None,
    help="Answer from the store in this folder (sensai record) instead of running a model.",
)
@click.option(
    "--record",
    default=None,
    help="Also record every answer into the store in this folder (lossless level).",
)
@click.option(
    "--fallback",
    default=None,
    help="With --replay: send sequences the store lacks to the live teacher at this "
    "address, and record its answers into the store.",
)
def serve(**kw: Any) -> None:
    """Serve a teacher model. Prints the address to pass to sensai.Client when ready."""
    run_serve(**kw)


@cli.command("info")
@click.argument("address")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server (connecting, then answering).",
)
def info(address: str, timeout: float) -> None:
    """Print the configuration of the server at ADDRESS (e.g. shm:///dev/shm/sensai-123)."""
    from .errors import SensAIError
    from .transports import connect

    try:
        client = connect(address, connect_timeout=timeout)
    except (SensAIError, ValueError, OSError) as e:
        raise click.ClickException(f"cannot connect to {address}: {e}") from None
    try:
        msg = client.request_message([], kind="control", tag=INFO_TAG, timeout=timeout)
        config = decode_info(msg)
    except (SensAIError, ValueError) as e:
        raise click.ClickException(f"INFO request to {address} failed: {e}") from None
    finally:
        client.close()
    click.echo(json.dumps(config, indent=2))


# The flags of `sensai serve` that `sensai record` shares: what the teacher is and how it samples.
_RECORD_SHARED = (
    "model", "device", "num_samples", "temperature", "top_p", "top_k", "output_format", "topk",
    "max_batch_tokens", "threads", "seed", "log_level",
)  # fmt: skip


def record_options(f: Any) -> Any:
    """`serve_options`' teacher and sampling flags, the same definitions (defaults, checks)."""
    params = serve_options(lambda **kw: None).__click_params__
    if not hasattr(f, "__click_params__"):
        f.__click_params__ = []
    f.__click_params__.extend(p for p in params if p.name in _RECORD_SHARED)
    return f


@cli.command("record")
@click.option("--data", required=True, type=click.Path(exists=True), help="Token ids: a "
              ".jsonl or .parquet file, a folder of them, or a `datasets` folder "
              "(save_to_disk).")  # fmt: skip
@click.option("--out", "out_dir", required=True, help="The store's folder (created; resumed).")
@click.option("--column", default="input_ids", show_default=True, help="Column of token ids.")
@click.option("--text-column", default=None, help="A text column, encoded by the teacher's "
              "tokenizer (instead of --column).")  # fmt: skip
@click.option(
    "--level",
    type=click.Choice(["lossless", "fp16", "counts"]),
    default="lossless",
    show_default=True,
    help="lossless: the format's tensors as sent; fp16: compact/topk with float16 log-probs; "
    "counts: compact tokens and counts only (T = 1 sampled KD gradient, no log-probs).",
)
@click.option(
    "--samples-per-epoch",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Independent sample sets per sequence (a replay's set_epoch picks one).",
)
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--progress/--no-progress", default=True, help="A tqdm progress bar on stderr "
              "when it is a terminal (in a log: a line every --rows-per-shard "
              "sequences).")  # fmt: skip
@record_options
def record(**kw: Any) -> None:
    """Record a teacher's answers over a tokenised dataset into a store (resumable)."""
    _check_flags({**kw, "max_elems": None, "max_nbytes": None, "transport": None,
                  **{name: None for name in _PATH_FLAG.values()}})  # fmt: skip
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, kw["log_level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .errors import SensAIError

    try:
        from .store import StoreWriter, dataset_hash
        from .store.record import (
            count_sequences,
            manifest_for,
            model_revision,
            read_sequences,
            record_sequences,
        )
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    from .teacher.load import resolve_model

    try:
        resolved = resolve_model(kw["model"])
        data_hash = dataset_hash(kw["data"])
        total = count_sequences(kw["data"])
    except (SensAIError, OSError) as e:
        raise click.ClickException(str(e)) from None
    teacher = load_cli_teacher(kw)
    from tqdm import tqdm

    try:
        manifest = manifest_for(
            teacher,
            kw["level"],
            model=kw["model"] or "SmolLM2-135M-Instruct (embedded)",
            revision=model_revision(resolved.path) if resolved.kind != "hub" else None,
            dataset={"path": str(kw["data"]), "hash": data_hash},
            samples_per_epoch=kw["samples_per_epoch"],
        )
        with StoreWriter(kw["out_dir"], manifest, rows_per_shard=kw["rows_per_shard"]) as w:
            held = len(w)
            # tqdm on a terminal only (disable=None); in a log, a plain line now and then
            bar = tqdm(total=total, unit="seq", disable=None if kw["progress"] else True)
            every, done = kw["rows_per_shard"], [0]

            def progress(n: int) -> None:
                bar.update(n)
                if kw["progress"] and bar.disable:
                    done[0] += n
                    if done[0] // every > (done[0] - n) // every or done[0] == total:
                        log.info("recorded %d of %d sequences", done[0], total)

            seqs = read_sequences(
                kw["data"],
                kw["column"],
                text_column=kw["text_column"],
                tokenizer=teacher.tokenizer,
                vocab_size=teacher.vocab_size,
            )
            try:
                n = record_sequences(
                    teacher,
                    seqs,
                    w,
                    max_batch_tokens=kw["max_batch_tokens"],
                    samples_per_epoch=kw["samples_per_epoch"],
                    seed=kw["seed"],
                    progress=progress,
                )
            finally:
                bar.close()
    except SensAIError as e:
        raise click.ClickException(str(e)) from None
    log.info("recorded %d sequences into %s (%d rows were there)", n, kw["out_dir"], held)
    click.echo(f"store://{os.path.abspath(kw['out_dir'])}")


def main(argv: list[str] | None = None) -> None:
    """The ``sensai`` console script."""
    _run(cli, argv, "sensai")


def serve_main(argv: list[str] | None = None, prog_name: str = "sensai serve") -> None:
    """``sensai serve`` as a standalone command (``python -m sensai.logits_server``)."""
    command = click.command(
        help="Serve a teacher model (the same flags as `sensai serve`). Prints the address "
        "to pass to sensai.Client when ready."
    )(serve_options(run_serve))
    _run(command, argv, prog_name)


if __name__ == "__main__":
    main()
