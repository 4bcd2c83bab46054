"""Helpers shared by the commands: error reporting, device choice, model loading."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from sslam_core.errors import SslamError

if TYPE_CHECKING:
    import torch

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Options shared by the commands that run a model over audio files.
Window = Annotated[
    float | None,
    typer.Option(help="Window length in seconds [default: the model's training length, else 10.24]."),
]
Hop = Annotated[float | None, typer.Option(help="Hop between windows in seconds [default: the window].")]
EventsHop = Annotated[
    float | None,
    typer.Option(help="Hop between windows in seconds [default: the window; with --events a quarter of it]."),
]
StrongHop = Annotated[
    float | None,
    typer.Option(help="Hop between windows in seconds [default: the window; with --strong a quarter of it]."),
]
Norm = Annotated[
    str | None,
    typer.Option(help="Normalisation: audioset, esc50, spc2, spass or MEAN,STD [default: the checkpoint's]."),
]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", help="Windows per forward pass [default: 4 on CPU, 32 on GPU]."),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-w",
        help="Processes decoding audio ahead of the model, 0 = in the main process [default: 0 on CPU, "
        "4 on GPU].",
    ),
]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")]
Calibration = Annotated[
    str | None,
    typer.Option(
        "--calibration",
        help="Audio folder --precision auto checks the faster precision on [default: built-in clips].",
    ),
]
Precision = Annotated[
    str,
    typer.Option(
        help="fp32, bf16, fp16, int8 (CPU: the ONNX Runtime int8 model, cached) or auto (the fastest of "
        "int8 on a CPU, bf16 where native, fp32 under which this model keeps its results, checked once; "
        "a note says which)."
    ),
]

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2


class CommandError(SslamError):
    """A command-line problem found by the command itself (a bad option value, no input files)."""


def fail(message: str) -> NoReturn:
    """Stop the command with one error line and exit status 2 (printed by the `sslam` group, as every
    `SslamError` is). `message` is plain text, paths and all."""
    raise CommandError(message)


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr. The message is escaped, so square brackets in file names print as
    they are. Under torchrun only rank 0 prints it: every rank runs the same checks on the same
    arguments and would print the same line (each still exits with its status, which torchrun reports)."""
    if rank_in_run():
        return
    err_console.print(f"[red]error:[/red] {escape(message)}", markup=True)


def warn(message: str) -> None:
    """One line on stderr, for a skipped file or similar (plain text, escaped like `fail`)."""
    err_console.print(f"[yellow]skipped:[/yellow] {escape(message)}", markup=True)


def claim_resumable(path, overwrite: bool, resume: bool):
    """`claim_or_fail` for an output written through a journal (`PATH.parts/`): an existing output or
    the journal of an interrupted run is only replaced with --overwrite, and continued with --resume."""
    from pathlib import Path

    parts = Path(f"{path}.parts")
    if parts.exists() and not (overwrite or resume):
        fail(f"{parts} holds an interrupted run; pass --resume to finish it or --overwrite to start over")
    return claim_or_fail(path, overwrite or resume, "--overwrite (or --resume to finish an interrupted run)")


def check_plot_output(path, flag: str = "--plot") -> None:
    """A PNG output needs a .png name and matplotlib (the `plot` extra): say so before any work."""
    from sslam_core.evaluation.plots import pyplot

    if path.suffix.lower() != ".png":
        fail(f"{flag} {path}: expected a .png file")
    try:
        pyplot()
    except RuntimeError as e:
        fail(f"{flag}: {e}")


def pipeline_options(run: dict, device: torch.device, model, norm: str | None, target_length: int, hop: int):
    """The inference pipeline's `PipelineOptions` from a command's flags: windows of `target_length`
    frames every `hop`, and --batch-size, --workers, --precision (held in `run` by name) and --norm."""
    from sslam_core.inference.options import PipelineOptions

    return PipelineOptions(
        target_length=target_length,
        hop=hop,
        batch_size=run["batch_size"],
        workers=run["workers"],
        device=device,
        precision=run["precision"],
        normalization=parse_norm(norm, model.normalization),
    )


def rank_in_run() -> int:
    """This process's torchrun rank (0 in a single process), read without importing torch."""
    return int(os.environ.get("RANK", "0"))


def note(message: str) -> None:
    """One plain-text line on stderr (a summary, a warning), never read as Rich markup. Under
    torchrun only rank 0 prints notes, which every rank would otherwise repeat."""
    if rank_in_run():
        return
    err_console.print(message, markup=False)


def claim_or_fail(path, overwrite: bool = False, flag: str = "--overwrite"):
    """`outputs.claim_output` (a refusal is an OutputError: one error line, exit status 2)."""
    from sslam_core.runs.outputs import claim_output

    return claim_output(path, overwrite, flag)


def pick_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"unknown device {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("CUDA was requested but is not available")
    return dev


def check_precision(precision: str, device: torch.device, int8: bool = False) -> str:
    """The precision to run: fp32, bf16, fp16, or where `int8` (inference) also int8, which runs the
    checkpoint's ONNX Runtime int8 model (quantised on first use and cached, see
    `checkpoints.load_model`), and auto, resolved by `precision.auto_precision` with one note saying
    what it chose and why."""
    from sslam_core.models.precision import auto_precision, cpu_capability

    choices = ("fp32", "bf16", "fp16", "int8", "auto") if int8 else ("fp32", "bf16", "fp16")
    if precision not in choices:
        fail(f"unknown precision {precision!r}; choose {', '.join(choices)}")
    if precision == "auto":  # checked on the model once it is loaded; `settle_auto` says what runs
        return auto_precision(device)[0]
    if precision == "int8" and device.type != "cpu":
        fail("--precision int8 runs on the CPU (ONNX Runtime); use bf16 or fp16 on a GPU")
    cpu = cpu_capability() if device.type == "cpu" else None
    if precision == "bf16" and cpu is not None and not cpu.native_bf16:
        note(f"note: this CPU has no native bf16 ({cpu}): bf16 is emulated, usually slower than fp32")
    if precision == "fp16" and device.type == "cpu":
        note("note: fp16 on CPU is usually slower than fp32")
    return precision


def settle_auto(
    model,
    requested: str,
    chosen: str,
    device: torch.device,
    calibration: str | None = None,
    checkpoint: str | None = None,
    int8_ok: bool = False,
    teacher: bool = False,
):
    """For `--precision auto`: the fastest precision under which this model keeps its results on the
    check clips (`inference.precision_check`, cached per checkpoint), and the model to run it with.
    On a CPU, with the `[onnx]` extra, where the command can run it (`int8_ok`), int8 is tried first
    (its model quantised and cached on first use); then the precision `check_precision` proposed (bf16
    where computed natively); else fp32. One note says what runs and why. Other precisions pass
    through. Returns (precision, model)."""
    from sslam_core.inference.precision_check import AGREEMENT, MIN_COSINE, cached_check
    from sslam_core.models.precision import auto_precision, cpu_capability
    from sslam_core.models.transformer import Classifier, Encoder

    if requested != "auto":
        return chosen, model
    torch_model = isinstance(model, (Encoder, Classifier)) and not hasattr(model, "session")
    capability = cpu_capability().name if device.type == "cpu" else device.type
    why = auto_precision(device)[1]

    def check(precision: str, candidate=None):  # (verdict, "checked now" or "checked before")
        verdict, cached = cached_check(model, precision, device, calibration, capability, candidate=candidate)
        return verdict, "checked before" if cached else "checked now"

    moved = []
    if torch_model and int8_ok and checkpoint and device.type == "cpu" and _onnx_available():
        from sslam_core.models.factory import load_model
        from sslam_core.models.onnx_export import int8_cached

        sha = (model.checkpoint_info or {}).get("sha256")
        if sha and not int8_cached(sha, teacher):
            once = "once; seconds for a small model, about half a minute for a ViT-B on 2 cores"
            note(f"note: --precision auto: quantising the int8 model of {checkpoint} to check it ({once})")
        with int8_progress():
            int8 = load_model(checkpoint, device=device, teacher=teacher, precision="int8")
        note_uncached(int8, checkpoint)
        verdict, when = check("int8", int8)
        if verdict.passed:
            kept = f"it keeps this model's results ({when}: {verdict.summary()})"
            note(f"note: --precision auto runs int8: {kept}")
            return "int8", int8
        moved.append(f"int8 moved its results ({when}: {verdict.summary()})")
    if chosen == "fp32":
        note(f"note: --precision auto runs fp32: {'; '.join([*moved, why])}")
        return chosen, model
    if not torch_model:  # an ONNX export runs as exported
        note(f"note: --precision auto runs {chosen}: {why}")
        return chosen, model
    verdict, when = check(chosen)
    if verdict.passed:
        note(f"note: --precision auto runs {chosen}: {why}; {when} on this model: {verdict.summary()}")
        return chosen, model
    moved.append(f"{chosen} moved this model's results ({when}: {verdict.summary()})")
    needs = f"a faster precision needs top-1 agreement {AGREEMENT} and cosine {MIN_COSINE}"
    note(f"note: --precision auto runs fp32: {'; '.join(moved)}; {needs}")
    return "fp32", model


def _onnx_available() -> bool:
    """Whether the `[onnx]` extra imports (int8 needs ONNX Runtime and the exporter)."""
    from sslam_core.models.onnx_export import EXPORT_MODULES
    from sslam_core.models.onnx_runtime import OnnxUnavailable, require

    try:
        require(*EXPORT_MODULES)
    except OnnxUnavailable:
        return False
    return True


def parse_norm(norm: str | None, default=None) -> str | tuple[float, float]:
    """`audioset|esc50|spc2|spass` or `MEAN,STD` (finite, STD > 0); None -> the checkpoint's own or
    AudioSet's. Anything else is one error line, before any work is done."""
    import math

    from sslam_core.audio.constants import NORMALIZATION

    presets = ", ".join(NORMALIZATION)
    if norm is None:
        return default or "audioset"
    if "," in norm:
        try:
            mean, std = (float(v) for v in norm.split(","))
        except ValueError:
            fail(f"--norm {norm!r}: expected a preset ({presets}) or MEAN,STD")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            fail(f"--norm {norm!r}: MEAN and STD must be finite and STD positive")
        return mean, std
    if norm not in NORMALIZATION:
        fail(f"--norm {norm!r}: unknown preset; choose {presets} or MEAN,STD")
    return norm


def frames_or_fail(model, window: float | None, hop: float | None, target_length: int | None = None):
    """(window, hop) in frames for `model` (see `inference.resolve_window`), or one error line; a note
    when a window or hop in seconds was rounded to whole time patches, and when the window is longer
    than what the model was trained on."""
    from sslam_core.audio.constants import frames_to_seconds
    from sslam_core.inference.windows import resolve_window, window_warning

    frames, hop_frames = resolve_window(model, window, hop, target_length)
    asked_window = window if target_length is None else None  # --target-length is in frames already
    for flag, asked, got in (("--window", asked_window, frames), ("--hop", hop, hop_frames)):
        if asked is not None and abs(frames_to_seconds(got) - asked) > 1e-6:
            note(f"note: {flag} {asked:g} s runs as {frames_to_seconds(got):g} s (whole 160 ms patches)")
    warning = window_warning(model, frames)
    if warning:
        note(warning)
    return frames, hop_frames


def parse_folds(text: str | None, flag: str = "--folds") -> list[int] | None:
    """`1,2,3` -> [1, 2, 3] (ESC-50 style folds); None stays None."""
    if not text:
        return None
    try:
        return [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected fold numbers such as 5 or 1,2,3,4")


def load_model_or_fail(checkpoint: str, device: torch.device, teacher: bool = False, precision: str = "fp32"):
    """Load a checkpoint (an `.onnx` export too; `precision="int8"`: its cached ONNX Runtime int8
    model); any problem becomes one line and exit status 2."""
    from sslam_core.models.factory import load_model

    with int8_progress():
        model = load_model(checkpoint, device=device, teacher=teacher, precision=precision)
    note_export_precision(model, precision)
    note_uncached(model, checkpoint)
    return model


@contextlib.contextmanager
def int8_progress() -> Iterator[None]:
    """A progress bar over the steps of making an int8 model, shown on a terminal while one is made
    (first use of a checkpoint's int8 model; a cached one reports no step and shows nothing)."""
    from tqdm import tqdm

    from sslam_core.models.onnx_export import EXPORT_STEPS, export_progress

    bar = None

    def step(name: str) -> None:
        nonlocal bar
        if rank_in_run() or not err_console.file.isatty():
            return
        if bar is None:
            total = len(EXPORT_STEPS)
            bar = tqdm(total=total, unit="step", desc="int8 model", postfix=name, file=err_console.file)
        else:
            bar.update(1)
            bar.set_postfix_str(name)

    try:
        with export_progress(step):
            yield
        if bar is not None:
            bar.set_postfix_str("done", refresh=False)
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()


def note_uncached(model, checkpoint: str) -> None:
    """Say when an int8 model could not be cached (it was quantised for this run only)."""
    reason = getattr(model, "uncached", None)
    if reason:
        note(f"warning: the int8 model of {checkpoint} is quantised for this run only: its cache cannot "
             f"be written ({reason}); set SSLAM_CACHE to a writable folder to keep it")  # fmt: skip


def note_export_precision(model, precision: str) -> None:
    """A note when `model` is an `.onnx` export of another precision than `precision`: an export runs
    as it was exported (fp32 or int8), whatever --precision says."""
    from sslam_core.models.onnx_runtime import OnnxModel

    if isinstance(model, OnnxModel) and model.cached_for is None and model.precision != precision:
        source = model.checkpoint_info.get("source", "the model")
        note(f"note: {source} is an {model.precision} ONNX export and runs {model.precision}; --precision "
             f"{precision} applies to torch checkpoints")  # fmt: skip


OUTPUT_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".tsv": "dcase"}


def output_format(fmt: str | None, output, choices: tuple[str, ...]) -> str:
    """The --format to write: the one given, else the one `output`'s extension names (`tags.csv` is CSV,
    not a table drawn into a .csv file) when the command offers it, else table."""
    if fmt is not None:
        return fmt
    named = OUTPUT_FORMATS.get(Path(output).suffix.lower()) if output is not None else None
    return named if named in choices else "table"


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename; a write error is one line, exit 2."""
    from sslam_core.runs.outputs import write_text

    write_text(path, text)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def render(*renderables, terminal: bool | None = None) -> str:
    """Rich tables and text as a string: at the terminal's width for a terminal (default: when stdout
    is one), else without wrapping (pipes, files), so that long paths and rows stay on one line.
    Build cells with `cell()` so that brackets in names are not read as markup."""
    import io
    import shutil

    terminal = stdout_is_tty() if terminal is None else terminal
    width = shutil.get_terminal_size().columns if terminal else 100_000
    out = Console(record=True, width=width, file=io.StringIO())
    for r in renderables:
        out.print(r)
    text = out.export_text()
    if terminal:
        return text
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def echo(text: str) -> None:
    """Write `text` to stdout now (results stream as they finish). A closed pipe (`| head`) ends the
    command quietly."""
    import os

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None


def cell(value) -> Text:
    """A table cell or title holding `value` verbatim (no markup)."""
    return Text(str(value))


def interrupted(stop, done: int, resumable: bool = True) -> NoReturn:
    """After a SIGINT / SIGTERM was honoured: one line and the conventional exit status. A torchrun
    rank 0 that got no signal itself stops because another rank did: it says so, and exits 143."""
    hint = "; rerun with --resume to finish" if resumable else ""
    if not stop.requested:
        message = f"stopped: another rank was interrupted, after {done} file(s) here{hint}"
        err_console.print(message, markup=False)
        raise typer.Exit(143)
    note(f"interrupted ({stop.name}) after {done} file(s){hint}")
    raise typer.Exit(stop.exit_code)


def exit_status(written: int, skipped: int) -> int:
    """The exit status of a run over files: 2 when nothing was done, 1 when some files were skipped,
    0 otherwise. Under torchrun a run that wrote its output ends 0 even with skipped files (they are
    on stderr and in the output): torchrun reports any other status as a crash of the whole job."""
    if rank_in_run():
        return EXIT_OK  # rank 0 reports on the whole run; an empty share is no failure
    from sslam_core.runs import distributed

    if not written:
        return EXIT_USAGE
    return EXIT_SKIPPED if skipped and not distributed.launched() else EXIT_OK


def join_ranks(device: torch.device) -> torch.device:
    """Join the other processes of a `torchrun` inference run (gloo) and return this process's
    device (CUDA device LOCAL_RANK); the device as given in a single process."""
    from sslam_core.runs import distributed

    if not distributed.launched():
        return device
    try:
        return distributed.init_inference(device).device
    except (RuntimeError, ValueError) as e:
        fail(f"cannot join the other torchrun processes: {(str(e).splitlines() or [''])[0]}")


# The event options, shared by `sslam tag --events` and `sslam eval --strong` (which scores the events
# `tag --events` writes).
EVENTS_PER_WINDOW = 4  # with --events and no --hop: windows every quarter window (window frame scores)

# The event options, shared with `sslam eval --strong` (which scores the events `tag --events` writes).
EventThreshold = Annotated[
    str, typer.Option(help="Score at which an event starts, or a CSV of LABEL,THRESHOLD per class.")
]

OffThreshold = Annotated[
    float | None, typer.Option(help="Score below which it ends (hysteresis) [default: --event-threshold].")
]

Median = Annotated[float, typer.Option(help="Median filter of the step scores, in seconds.")]

MinDuration = Annotated[float, typer.Option(help="Shorter events are dropped (s).")]

MinGap = Annotated[float, typer.Option(help="Events of a class closer than this merge (s).")]

FrameScores = Annotated[
    str,
    typer.Option(
        help="window: each step the mean of the windows covering it; token: the head on each step's "
        "tokens (mean-pooling classifiers; default --hop the window)."
    ),
]


def event_options(threshold: str, off, median, min_duration, min_gap, names, frame_scores: str = "window"):
    """EventOptions from the flags. A CSV --event-threshold is read against the model's `names`; before
    the model is loaded (`names` empty) only the flags' values are checked."""
    from sslam_core.inference.events import FRAME_SCORES, EventOptions, read_thresholds

    if frame_scores not in FRAME_SCORES:
        fail(f"--frame-scores {frame_scores!r}: choose {' or '.join(FRAME_SCORES)}")

    per_class, base = (), 0.5
    try:
        base = float(threshold)
    except ValueError:
        if not Path(threshold).is_file():
            fail(f"--event-threshold {threshold}: neither a number nor a CSV file of LABEL,THRESHOLD")
        try:
            per_class = read_thresholds(threshold, names) if names else ()
        except (OSError, ValueError) as e:
            fail(f"--event-threshold {threshold}: {e}")
    try:
        return EventOptions(base, off, median, min_duration, min_gap, per_class=per_class)
    except ValueError as e:
        fail(f"--events: {e}")


def token_scores_or_fail(model, frame_scores: str) -> None:
    """With --frame-scores token, one line saying why `model` cannot give them, if it cannot."""
    from sslam_core.inference.events import check_token_scores

    if frame_scores == "token":
        try:
            check_token_scores(model)
        except ValueError as e:
            fail(f"--frame-scores token: {e}")


def events_hop(frames: int, frame_scores: str) -> int:
    """The default hop (frames) for events: a quarter window for window scores, the window for token
    scores (each step is scored inside one window)."""
    return frames if frame_scores == "token" else max(16, frames // EVENTS_PER_WINDOW // 16 * 16)


def finish(summary: dict, report: dict) -> None:
    """The last stdout line: `report` as JSON; after a signal, the stop line on stderr and its status."""
    if "interrupted" in summary:
        report["interrupted"] = summary["interrupted"]
    typer.echo(json.dumps(report))
    if "interrupted" in summary:
        note(f"interrupted at step {summary['steps']}; rerun with --resume to continue")
        raise typer.Exit(summary["exit_code"])


def report_inputs(inputs, paths: list[str]) -> None:
    """The inputs that could not be listed (a missing file, an empty folder): one `skipped:` line each
    when other inputs remain; when none does, the run stops with one error line saying why."""
    if not inputs:
        fail("; ".join(inputs.problems) if inputs.problems else "no audio files found in " + ", ".join(paths))
    for problem in inputs.problems:
        warn(problem)


def note_ignored(flags: dict[str, bool], needs: str) -> None:
    """One note naming the options given (`flags`: option -> whether it was changed from its default)
    that do nothing without `needs`, so that none is ignored silently."""
    given = [flag for flag, changed in flags.items() if changed]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        note(f"note: {', '.join(given)} {verb} only with {needs}; ignored")


def event_flags(threshold: str, off, median: float, min_duration: float, min_gap: float, frame_scores: str):
    """Which of the event options were changed from their defaults (see `note_ignored`)."""
    return {
        "--event-threshold": threshold != "0.5",
        "--off-threshold": off is not None,
        "--median": median != 0.48,
        "--min-duration": min_duration != 0.16,
        "--min-gap": min_gap != 0.32,
        "--frame-scores": frame_scores != "window",
    }
