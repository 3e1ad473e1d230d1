"""Options and helpers shared by the `mind` commands: one definition of each flag, so that a flag reads the
same environment variable and says the same thing in every command that takes it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError

from mind.dataset import Interactions
from mind.loaders import DataError, filter_kcore, load
from mind.synthetic import generate
from stream.embedded.stack import StackError, resolve, terminate_as_interrupt
from stream.settings import Settings, load_settings

# ---- data and model ------------------------------------------------------------------------------------

Data = Annotated[
    Path | None,
    typer.Option(
        "--data",
        envvar="MIND_DATA",
        help="Data set (file or directory); default: synthetic planted interests.",
    ),
]
Fmt = Annotated[
    str, typer.Option("--format", envvar="MIND_FORMAT", help="auto|recbole|sequences|pairs|jsonl")
]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip malformed lines (counted and reported).")]
K_ = Annotated[int | None, typer.Option("--K", "-k", envvar="MIND_K", help="Maximum interests K.")]
D_ = Annotated[int | None, typer.Option("--dim", "-d", envvar="MIND_DIM", help="Embedding dimension d.")]
P_ = Annotated[float | None, typer.Option("--p", envvar="MIND_P", help="Attention power p (inf = hard).")]
SIGMA_ = Annotated[float | None, typer.Option("--sigma", envvar="MIND_SIGMA", help="Routing-logit init std.")]
ITERS_ = Annotated[int | None, typer.Option("--iters", envvar="MIND_ITERS", help="Routing iterations r.")]
LEN_ = Annotated[int | None, typer.Option("--max-len", envvar="MIND_MAX_LEN", help="Behaviour window L.")]
INIT_ = Annotated[
    str | None,
    typer.Option("--routing-init", envvar="MIND_ROUTING_INIT", help="kmeans++ (default) | cover | random"),
]
NEG_ = Annotated[int | None, typer.Option("--neg", envvar="MIND_NEG", help="Sampled negatives per batch.")]
EPOCHS_ = Annotated[int | None, typer.Option("--epochs", envvar="MIND_EPOCHS", help="Maximum epochs.")]
LR_ = Annotated[float | None, typer.Option("--lr", envvar="MIND_LR", help="Adam learning rate.")]
BATCH_ = Annotated[int | None, typer.Option("--batch-size", envvar="MIND_BATCH_SIZE")]
SEED_ = Annotated[int, typer.Option("--seed", envvar="MIND_SEED")]
TUNED_ = Annotated[
    Path,
    typer.Option(
        "--tuned-dir",
        envvar="MIND_TUNED_DIR",
        help="Where `evaluate --tune` records its choice per data set; `train` and `evaluate` then use it.",
    ),
]
IGNORE_TUNED_ = Annotated[
    bool,
    typer.Option(
        "--ignore-tuned",
        envvar="MIND_IGNORE_TUNED",
        help="Train with the rules, not a recorded --tune choice.",
    ),
]
BUDGET_ = Annotated[
    float | None,
    typer.Option("--budget", envvar="MIND_BUDGET", help="Seconds of training per model (default: none)."),
]
SOFTMAX_ = Annotated[
    str | None, typer.Option("--softmax", envvar="MIND_SOFTMAX", help="sampled | full (every item).")
]
HARD_BETA_ = Annotated[
    float | None,
    typer.Option(
        "--hard-beta", envvar="MIND_HARD_BETA", help="Hard negatives: weight exp(beta*score); 0 = off."
    ),
]
RR_ = Annotated[
    float | None, typer.Option("--rr", envvar="MIND_RR", help="Routing regulariser weight; 0 = off.")
]
TIME_GAPS_ = Annotated[
    int | None,
    typer.Option(
        "--time-gaps", envvar="MIND_TIME_GAPS", help="Time-gap buckets (data with timestamps); 0 = off."
    ),
]
RECENCY_ = Annotated[
    int | None, typer.Option("--recency", envvar="MIND_RECENCY", help="Recency-rank embeddings; 0 = off.")
]
DYNAMIC_K_ = Annotated[
    bool | None,
    typer.Option(
        "--dynamic-k/--all-interests", envvar="MIND_DYNAMIC_K", help="K' = log2 |I_u| (default) or always K."
    ),
]
PROFILE_ = Annotated[
    bool | None,
    typer.Option(
        "--profile/--no-profile",
        envvar="MIND_PROFILE",
        help="The interests read the user's profile ids beside the behaviours (the paper). "
        "Default: off for MIND-K, on for one-vector models; without profile data it changes nothing.",
    ),
]
DROPOUT_ = Annotated[
    float | None,
    typer.Option("--dropout", envvar="MIND_DROPOUT", help="Dropout on the capsules in training; 0 = off."),
]
BEHAVIOUR_DROPOUT_ = Annotated[
    float | None,
    typer.Option(
        "--behaviour-dropout",
        min=0.0,
        max=0.9,
        envvar="MIND_BEHAVIOUR_DROPOUT",
        help="Share of a window's behaviours each training step drops (never the newest); 0 = off. "
        "Default: 0.4 for MIND-K, 0 for one-vector models.",
    ),
]
TEMPERATURE_ = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        envvar="MIND_TEMPERATURE",
        help="> 0: cosine / temperature; 0 = dot. Default: 0.1 for MIND-K, 0 for one-vector models.",
    ),
]
MERGE_DECAY_ = Annotated[
    float | None,
    typer.Option(
        "--merge-decay",
        min=0.0,
        max=1.0,
        envvar="MIND_MERGE_DECAY",
        help="Served interest j scores x decay^j in the max-merge (interest 0 is seeded on the newest "
        "click); 1 = plain max. Default: 0.9 for MIND-K.",
    ),
]
THREADS_ = Annotated[
    int, typer.Option("--threads", envvar="MIND_THREADS", help="Torch threads (0 = default).")
]
CKPT_ = Annotated[
    Path, typer.Option("--checkpoint", "-c", envvar="MIND_CHECKPOINT", help="Trained model (mind train).")
]
REPO_ = Annotated[Path, typer.Option("--repo", envvar="MIND_MODEL_REPO", help="Triton model repository.")]
MODEL_NAME_ = Annotated[
    str, typer.Option("--model-name", envvar="MIND_TRITON_MODEL", help="Model name in the repository.")
]

# ---- replay pacing -------------------------------------------------------------------------------------

Speed = Annotated[
    str,
    typer.Option("--speed", envvar="MIND_REPLAY_SPEED", help="asap, or N = N times the original pacing."),
]
Users = Annotated[int | None, typer.Option("--users", min=1, help="Replay only the first N test users.")]

# ---- stream settings -----------------------------------------------------------------------------------

Config = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Settings file (TOML/YAML/JSON/.env); else $MIND_CONFIG.", show_default=False
    ),
]
RunDir = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Embedded stack's data and logs (MIND_RUN_DIR; default runs/stack)."),
]
Bootstrap = Annotated[
    str | None, typer.Option("--bootstrap", help="Kafka host:port[,...] (MIND_KAFKA_BOOTSTRAP).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def fail(message: object, code: int = 2) -> typer.Exit:
    """Print `error: ...` in red on stderr and return the Exit to raise (`raise fail(...)`)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def setup_logging(verbose: bool = False, level: int | str | None = None) -> None:
    logging.basicConfig(
        level=level if level is not None else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def echo_json(obj: Any) -> None:
    typer.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


def load_data(data: Path | None, fmt: str, skip_bad: bool, kcore: bool = True) -> Interactions:
    """The data set for training/evaluation: a loaded file (5-core filtered) or synthetic data."""
    if data is None:
        return generate()
    try:
        inter = load(data, fmt=fmt, skip_bad=skip_bad)
    except (DataError, FileNotFoundError) as e:
        raise fail(e) from e
    return filter_kcore(inter) if kcore else inter


def model_overrides(
    K: int | None,
    d: int | None,
    p: float | None,
    sigma: float | None,
    iters: int | None,
    max_len: int | None,
    routing_init: str | None = None,
    *,
    time_gaps: int | None = None,
    recency: int | None = None,
    dynamic_k: bool | None = None,
    dropout: float | None = None,
    temperature: float | None = None,
    merge_decay: float | None = None,
    profile: bool | None = None,
) -> dict[str, Any]:
    """The model flags a user gave (None = not given: the data-driven default stands)."""
    given = {
        "K": K,
        "d": d,
        "p": p,
        "sigma": sigma,
        "iters": iters,
        "max_len": max_len,
        "routing_init": routing_init,
        "time_buckets": time_gaps,
        "recency": recency,
        "dynamic_k": dynamic_k,
        "dropout": dropout,
        "temperature": temperature,
        "merge_decay": merge_decay,
        "profile": profile,
    }
    return {k: v for k, v in given.items() if v is not None}


def train_overrides(
    *,
    epochs: int | None,
    lr: float | None,
    neg: int | None,
    batch_size: int | None,
    budget: float | None,
    softmax: str | None,
    hard_beta: float | None,
    rr: float | None,
    behaviour_dropout: float | None = None,
) -> dict[str, Any]:
    """The training flags a user gave (None = not given: the rules or the search decide)."""
    given = {
        "epochs": epochs,
        "lr": lr,
        "neg": neg,
        "batch_size": batch_size,
        "max_seconds": budget,
        "softmax": softmax,
        "hard_beta": hard_beta,
        "rr": rr,
        "behaviour_dropout": behaviour_dropout,
    }
    return {k: v for k, v in given.items() if v is not None}


def parse_speed(value: str) -> str | float:
    if value == "asap":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter("asap or a number", param_hint="--speed") from None


def settings_from(
    config: Path | None, run_dir: Path | None, use_stack: bool = True, **overrides: Any
) -> Settings:
    """Settings from config + env + flags; unset addresses filled from a running stack (use_stack)."""
    try:
        settings = load_settings(config, run_dir=run_dir, **overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise fail(f"settings: {exc}", 2) from None
    return resolve(settings) if use_stack else settings


@contextmanager
def interruptible(what_was_stopped: str = "everything started was stopped") -> Iterator[None]:
    """Ctrl-C or SIGTERM stop what the command started: exit 130 with a line saying so; a stack that
    failed to start exits 1 with its reason."""
    try:
        with terminate_as_interrupt():
            yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {what_was_stopped}", err=True)
        raise typer.Exit(130) from None
    except StackError as exc:
        raise fail(exc, 1) from None


def run_on_stack(
    out: Path, run: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """Run a benchmark that starts the embedded stack, then print its table and where it wrote."""
    with interruptible():
        res = run()
    typer.echo(table(res))
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {res['seconds']:.0f} s")
    return res
