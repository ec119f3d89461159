"""The evaluation runner: every (task, length, sample) under every method, appended to a JSONL file.

A run that is interrupted resumes: items whose key is already in the file are skipped, so nothing
finished is computed twice. Each sample is built once and run under all methods in a row, which also
keeps the dense reference logits of the perplexity task in memory for KL and top-1 agreement.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..integration import reset_density, sparsify, unsparsify
from ..methods import DenseConfig, MethodConfig, make_config, method_class
from ..tasks import ANSWER_TOKENS, DEPTH_TASKS, TASKS, TaskSample, build_task
from ..types import DualTopP, TopK, TopP
from .metrics import RecallRecorder, density_summary, kl_divergence, token_nll, top1_agreement

try:
    import fcntl
except ImportError:  # not on Windows: there a results file has one writer (no --jobs)
    fcntl = None

RESULTS_FILE = "results.jsonl"
BUDGET_KEYS = {"topp": TopP, "topk": TopK, "dual_topp": DualTopP}
DUAL_TOPP_KEYS = ("sink", "recent", "min_tokens", "max_tokens")
MIN_LENGTH = 128
MAX_PPL_POSITIONS = 2048  # perplexity/KL positions scored per document (its last half, at most this many)
ENGINES = ("auto", "static", "hf")  # how generation tasks decode (see check_engine)


class EvalArgumentError(ValueError):
    """A bad evaluation argument; ``param`` names it as on the command line (e.g. ``--tasks``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.detail = message


@dataclass(frozen=True)
class MethodSpec:
    """A method config and its label in results: the spec as written, e.g. ``oracle:topp=0.9``."""

    label: str
    config: MethodConfig


def _value(text: str) -> Any:
    """Numbers, booleans and null as JSON; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_spec(text: str) -> MethodSpec:
    """``NAME[:KEY=VALUE,...]``, e.g. ``dense``, ``oracle:topp=0.9,block_size=64``,
    ``oracle:topk=1024``, ``oracle:dual_topp=0.9,sink=128,recent=256,min_tokens=512``.

    The budget keys ``topp=P``, ``topk=TOKENS`` and ``dual_topp=P`` (with ``sink``, ``recent``,
    ``min_tokens``, ``max_tokens``) build the ``budget``; other keys are config fields of the method.
    """
    text = text.strip()
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    budget: tuple[str, Any] | None = None
    dual: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise EvalArgumentError("--methods", f"{item!r} in {text!r} is not KEY=VALUE")
        value = _value(raw)
        if key in BUDGET_KEYS:
            if budget is not None:
                raise EvalArgumentError("--methods", f"{text!r} gives two budgets ({budget[0]} and {key})")
            budget = (key, value)
        elif key in DUAL_TOPP_KEYS:
            dual[key] = value
        else:
            options[key] = value
    if budget is not None and "budget" in options:
        raise EvalArgumentError("--methods", f"{text!r} gives two budgets (budget and {budget[0]})")
    if dual and (budget is None or budget[0] != "dual_topp"):
        raise EvalArgumentError("--methods", f"{text!r}: {sorted(dual)} need a dual_topp=P budget")
    try:
        if budget is not None:
            options["budget"] = BUDGET_KEYS[budget[0]](budget[1], **dual)
        options = _token_budgets(name, options)
        config = make_config(name, **options)
    except (ValueError, TypeError) as exc:
        raise EvalArgumentError("--methods", f"{text!r}: {exc}") from exc
    return MethodSpec(text, config)


def _token_budgets(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A whole number given for a config field whose default is a ``TopK`` (Twilight's ``candidates``,
    Quest's ``budget``) becomes ``TopK(number)``: ``twilight:candidates=2048``."""
    try:
        fields = dataclasses.fields(method_class(name).Config)
    except ValueError:
        return options  # an unknown method: make_config names the allowed ones
    token_fields = {f.name for f in fields if f.default_factory is not dataclasses.MISSING
                    and isinstance(f.default_factory(), TopK)}
    return {key: TopK(value) if key in token_fields and type(value) is int else value
            for key, value in options.items()}


def split_method_specs(text: str) -> list[str]:
    """Split ``dense,oracle:topp=0.9,block_size=64;oracle:topp=0.5`` into specs: a ``KEY=VALUE`` part
    after a comma belongs to the spec before it (method names never contain ``=``)."""
    specs: list[str] = []
    for chunk in text.split(";"):
        current: list[str] = []
        for part in (p.strip() for p in chunk.split(",")):
            if not part:
                continue
            if "=" in part and ":" not in part.split("=", 1)[0]:
                if not current:
                    raise EvalArgumentError("--methods", f"{part!r} comes before any method name")
                current[-1] += "," + part
            else:
                current.append(part)
        specs += current
    return specs


def parse_methods(methods: str | Iterable[str | MethodSpec | MethodConfig]) -> list[MethodSpec]:
    """Method specs from a string (see :func:`split_method_specs`), spec strings, specs or configs."""
    items = split_method_specs(methods) if isinstance(methods, str) else list(methods)
    specs: list[MethodSpec] = []
    for item in items:
        if isinstance(item, MethodSpec):
            specs.append(item)
        elif isinstance(item, MethodConfig):
            specs.append(MethodSpec(_label_of(item), item))
        else:
            specs.extend(parse_method_spec(s) for s in split_method_specs(str(item)))
    if not specs:
        raise EvalArgumentError("--methods", "no method given")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise EvalArgumentError("--methods", f"a method spec is given twice: {labels}")
    return specs


def _label_of(config: MethodConfig) -> str:
    data = config.to_dict()
    name = data.pop("method")
    parts = []
    budget = data.pop("budget", None)
    if isinstance(budget, dict):
        rule = budget.pop("rule")
        head = budget.pop("p", budget.pop("tokens", None))
        parts.append(f"{rule}={head}")
        parts += [f"{k}={v}" for k, v in budget.items()]
    parts += [f"{k}={json.dumps(v)}" for k, v in data.items()]
    return name + (":" + ",".join(parts) if parts else "")


def parse_lengths(lengths: str | Iterable[int | str]) -> list[int]:
    """``2k,4k,8k`` (k = 1024) or plain token counts; at least :data:`MIN_LENGTH`."""
    items = lengths.split(",") if isinstance(lengths, str) else list(lengths)
    out: list[int] = []
    for item in items:
        text = str(item).strip().lower()
        if not text:
            continue
        scale = 1
        if text[-1] in "km":
            scale = 1024 if text[-1] == "k" else 1024 * 1024
            text = text[:-1]
        try:
            value = float(text) * scale
        except ValueError:
            message = f"{item!r} is not a length; use tokens like 2048 or 2k"
            raise EvalArgumentError("--lengths", message) from None
        if value != int(value) or value < MIN_LENGTH:
            raise EvalArgumentError("--lengths", f"{item!r} must be a whole number of tokens >= {MIN_LENGTH}")
        out.append(int(value))
    if not out:
        raise EvalArgumentError("--lengths", "no length given; use e.g. 2k,4k,8k")
    return out


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        what = f"unknown task(s) {unknown}" if unknown else "no task given"
        raise EvalArgumentError("--tasks", f"{what}; allowed: {', '.join(TASKS)} (or all)")
    return names


def model_window(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_lengths(
    lengths: Sequence[int], window: int | None, allow_beyond_window: bool, param: str = "--lengths"
) -> None:
    if window is None or allow_beyond_window:
        return
    too_long = [n for n in lengths if n > window]
    if too_long:
        raise EvalArgumentError(
            param,
            f"{too_long} exceed the model's context window of {window} tokens (max_position_embeddings); "
            f"use lengths <= {window}, or pass --allow-beyond-window (allow_beyond_window=True) "
            "to run anyway",
        )


def check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise EvalArgumentError("--samples", f"must be an integer >= 1, got {samples!r}")


def sample_seed(seed: int, task: str, index: int) -> int:
    """One seed per (run seed, task, sample): the same sample at every length and under every method."""
    return (seed * 1_000_003 + index * 7_919 + zlib.crc32(task.encode())) % (2**31)


def sample_depth(task: str, index: int) -> float | None:
    """Depth of sample ``index`` for depth tasks (the others draw positions from their seed).

    The sequence 0, 1, 1/2, 1/4, 3/4, 1/8, 3/8, ... (ends first, then base-2 van der Corput) covers 0..1
    evenly at every prefix and does not depend on the number of samples, so a run with more samples
    extends one with fewer instead of moving every needle.
    """
    if task not in DEPTH_TASKS:
        return None
    if index < 2:
        return float(index)
    depth, unit, n = 0.0, 0.5, index - 1
    while n:
        depth += unit * (n & 1)
        n, unit = n >> 1, unit / 2
    return depth


def item_key(
    model_name: str, task: str, length: int, index: int, seed: int, depth: float | None, label: str
) -> str:
    """Everything that decides an item's result."""
    where = "-" if depth is None else f"{depth:.4f}"
    return f"{model_name}|{task}|{length}|{index}|seed={seed}|depth={where}|{label}"


def read_results(path: str | Path) -> list[dict]:
    """Records of a results file; a torn last line (an interrupted write) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n}: skipping an unreadable line (interrupted write?)", stacklevel=2)
    return records


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (None instead), tensors as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


@dataclass
class EvalResult:
    """What :func:`run_eval` did: every record for the plan (old and new) and how many it computed."""

    path: Path
    records: list[dict]
    computed: int
    skipped: int
    keys: list[str] = field(default_factory=list)


def check_engine(engine: str, specs: Sequence[MethodSpec], recall: bool) -> None:
    """``hf`` decodes with Hugging Face ``generate()``; ``static`` with :func:`spotattn.generate` (the static
    cache and, on CUDA, one graph replay per token: the path the speed benchmarks time), which runs no
    per-layer observers and so measures no decode recall; ``auto`` takes ``static`` for the methods that
    have a static decoder when recall is off, else ``hf``."""
    if engine not in ENGINES:
        raise EvalArgumentError("--engine", f"{engine!r} is not an engine; allowed: {', '.join(ENGINES)}")
    if engine != "static":
        return
    if recall:
        raise EvalArgumentError("--engine", "static measures no attention recall (its decode steps run no "
                                "observers); pass --no-recall (recall=False), or use --engine hf or auto")
    from ..runtime.decode_path import static_decoder_names  # noqa: PLC0415 (the runtime imports the methods)

    names = static_decoder_names()
    without = [s.label for s in specs if s.config.method not in names]
    if without:
        raise EvalArgumentError("--engine", f"static needs a static decoder; {without} have none (methods with "
                                f"one: {', '.join(names)}); use --engine auto to decode those with hf")


def item_engine(engine: str, spec: MethodSpec, recall: bool) -> str:
    """The engine an item decodes with (``static`` or ``hf``), after :func:`check_engine`."""
    if engine == "auto":
        from ..runtime.decode_path import static_decoder_names  # noqa: PLC0415

        return "static" if not recall and spec.config.method in static_decoder_names() else "hf"
    return engine


def _generate(model, tokenizer, sample: TaskSample, engine: str = "hf") -> str:
    ids = sample.input_ids.to(model.device)
    eos = getattr(tokenizer, "eos_token_id", None)
    if engine == "static":
        from ..runtime.generate import end_ids, generate  # noqa: PLC0415

        gen = generate(model, ids, max_new_tokens=sample.max_new_tokens, eos_token_id=end_ids(model, tokenizer),
                       pad_token_id=eos)
        return tokenizer.decode(gen.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=eos,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _document_logits(model, sample: TaskSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting the last half of the document (at most MAX_PPL_POSITIONS tokens) and targets."""
    ids = sample.input_ids.to(model.device)
    n = min(ids.shape[1] // 2, MAX_PPL_POSITIONS)
    logits = model(ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1]
    return logits.float(), ids[0, -n:]


def run_item(
    model,
    tokenizer,
    sample: TaskSample,
    spec: MethodSpec,
    *,
    recall: bool = True,
    dense_logits: torch.Tensor | None = None,
    engine: str = "hf",
) -> tuple[dict, torch.Tensor | None]:
    """One sample under one method: the record's measurements, and the document logits (perplexity).
    ``engine``: ``hf`` or ``static``, how a generation task decodes (:func:`check_engine`)."""
    sparsify(model, spec.config)
    recorder = RecallRecorder(model) if recall else None
    logits = None
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        reset_density(model)
        with torch.no_grad():
            if sample.kind == "generate":
                text = _generate(model, tokenizer, sample, engine)
                out.update(output=text, score=sample.score(text), engine=engine)
            else:
                logits, targets = _document_logits(model, sample)
                nll = token_nll(logits, targets)
                out.update(nll=float(nll.mean()), ppl=math.exp(float(nll.mean())), scored_tokens=len(targets))
                reference = logits if dense_logits is None else dense_logits
                out.update(kl=float(kl_divergence(reference, logits).mean()),
                           top1=top1_agreement(reference, logits))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - start
        dens = density_summary(model)
        out["density"], out["density_layers"] = dens["mean"], dens["layers"]
        if recorder is not None:
            out["recall"] = {p: recorder.mean(p) for p in ("prefill", "decode")}
            out["recall_layers"] = {p: recorder.per_layer(p) for p in ("prefill", "decode")}
    finally:
        if recorder is not None:
            recorder.detach()
        unsparsify(model)
    return out, logits


@contextmanager
def _exclusive(sink) -> Iterator[None]:
    """Hold an exclusive lock on an open results file while appending (a whole record per lock)."""
    if fcntl is None:
        yield
        return
    fcntl.flock(sink.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(sink.fileno(), fcntl.LOCK_UN)


def check_results_file(
    path: Path, model_name: str, specs: Sequence[MethodSpec] = (), records: Iterable[dict] | None = None
) -> dict[str, dict[str, str]]:
    """Refuse to add records to a results file that would mix them with others under the same labels: the
    file holds another model's records (the report groups by method only, and a model path spelled
    differently resumes nothing), or a method label's records came from other files of the method (another
    selector checkpoint under the same name). ``records``: the file's, when already read. Returns each
    spec's artifacts by label, for its new records."""
    if records is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # run_eval reads the file again and warns about a torn line
            records = read_results(path)
    records = list(records)
    others = sorted({str(r["model"]) for r in records if "model" in r} - {model_name})
    if others:
        raise EvalArgumentError(
            "--out", f"{path} holds results of --model {others[0]!r}, not {model_name!r}; pass the same "
            "--model (spelled the same) to resume those, or give this model its own --out"
        )
    artifacts = {}
    for spec in specs:
        try:
            artifacts[spec.label] = now = spec.config.artifacts()
        except FileNotFoundError as exc:  # e.g. a selector checkpoint that is not there
            raise EvalArgumentError("--methods", f"{spec.label!r}: {exc}") from exc
        before = next((r["artifacts"] for r in records if r.get("method") == spec.label and "artifacts" in r
                       and r["artifacts"] != now), None)
        if before is not None:
            raise EvalArgumentError(
                "--methods", f"{spec.label!r}: {path} holds its results from other files ({before}; now {now}), "
                "e.g. another selector under the same name; give this run its own --out"
            )
    return artifacts


def run_eval(
    model,
    tokenizer,
    *,
    methods: str | Iterable[str | MethodSpec | MethodConfig],
    tasks: str | Iterable[str],
    lengths: str | Iterable[int | str],
    samples: int,
    out: str | Path,
    seed: int = 0,
    model_name: str = "model",
    allow_beyond_window: bool = False,
    recall: bool = True,
    progress: bool = True,
    time_limit: float | None = None,
    engine: str = "auto",
) -> EvalResult:
    """Evaluate ``methods`` on ``tasks`` x ``lengths`` x ``samples``, appending to ``out``/results.jsonl.

    ``lengths`` count the whole sequence: prompt plus the task's answer budget (as RULER does), so a
    length equal to the model's window fits it. Items already in the file are skipped (resume).
    Samples run in index order across all tasks and lengths, so a run cut short (or stopped by
    ``time_limit`` seconds, checked between samples) still covers every task and length. ``engine``: how
    generation tasks decode (:func:`check_engine`); the records name it.
    """
    check_samples(samples)
    task_names = parse_tasks(tasks)
    length_list = parse_lengths(lengths)
    specs = parse_methods(methods)
    check_engine(engine, specs, recall)
    check_lengths(length_list, model_window(model), allow_beyond_window)
    if tokenizer is None:
        raise EvalArgumentError("--model", "the evaluation needs a model with a tokenizer")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    done = {r["key"]: r for r in read_results(path) if "key" in r}
    artifacts = check_results_file(path, model_name, specs, done.values())

    plan = [(t, n, i) for i in range(samples) for n in length_list for t in task_names]
    all_keys = [item_key(model_name, t, n, i, seed, sample_depth(t, i), s.label)
                for t, n, i in plan for s in specs]
    skipped = sum(k in done for k in all_keys)
    computed = 0
    from tqdm.auto import tqdm  # noqa: PLC0415 (only the runner needs it)

    bar = tqdm(total=len(all_keys), initial=skipped, disable=not progress, unit="item", dynamic_ncols=True)
    dense_spec = MethodSpec("dense", DenseConfig())
    started = time.monotonic()
    try:
        with path.open("a", encoding="utf-8") as sink:
            with _exclusive(sink):
                if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                    sink.write("\n")  # a torn last line (interrupted write) must not swallow the next record
                    sink.flush()
            for task, length, index in plan:
                depth = sample_depth(task, index)
                keys = {s.label: item_key(model_name, task, length, index, seed, depth, s.label) for s in specs}
                todo = [s for s in specs if keys[s.label] not in done]
                if not todo:
                    continue
                if time_limit is not None and time.monotonic() - started > time_limit:
                    warnings.warn(f"time limit of {time_limit:.0f} s reached; rerun to resume", stacklevel=2)
                    break
                sseed = sample_seed(seed, task, index)
                prompt_len = length - ANSWER_TOKENS[task]
                sample = build_task(task, tokenizer, prompt_len, seed=sseed, depth=depth)
                dense_logits = None
                if sample.kind == "perplexity":
                    # KL and top-1 need the dense logits; compute them once unless dense runs anyway.
                    if not any(isinstance(s.config, DenseConfig) for s in todo):
                        _, dense_logits = run_item(model, tokenizer, sample, dense_spec, recall=False)
                for spec in sorted(todo, key=lambda s: not isinstance(s.config, DenseConfig)):
                    bar.set_postfix_str(f"{task} {length} #{index} {spec.label}", refresh=False)
                    result, logits = run_item(
                        model, tokenizer, sample, spec, recall=recall, dense_logits=dense_logits,
                        engine=item_engine(engine, spec, recall),
                    )
                    if isinstance(spec.config, DenseConfig) and logits is not None:
                        dense_logits = logits
                    key = keys[spec.label]
                    record = {
                        "key": key, "model": model_name, "task": task, "kind": sample.kind, "length": length,
                        "prompt_tokens": sample.num_tokens, "sample": index, "seed": seed,
                        "sample_seed": sseed,
                        "depth": sample.depth, "method": spec.label, "method_name": spec.config.method,
                        "config": spec.config.to_dict(),
                        **({"artifacts": artifacts[spec.label]} if artifacts[spec.label] else {}),
                        "answers": list(sample.answers),
                        "device": str(model.device), "dtype": str(next(model.parameters()).dtype),
                        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        **result,
                    }
                    record = _clean(record)
                    with _exclusive(sink):  # worker processes of --jobs append to the same file
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                    done[key] = record
                    computed += 1
                    bar.update(1)
                del dense_logits
    finally:
        bar.close()
    return EvalResult(path, [done[k] for k in all_keys if k in done], computed, skipped, all_keys)


def evaluate(
    model_name: str,
    *,
    methods: str | Iterable[str | MethodSpec | MethodConfig] = "dense,oracle:topp=0.9",
    tasks: str | Iterable[str] = "all",
    lengths: str | Iterable[int | str] = "2k",
    samples: int = 3,
    out: str | Path = "runs/eval",
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    allow_beyond_window: bool = False,
    recall: bool = True,
    progress: bool = True,
    report: bool = True,
    time_limit: float | None = None,
    engine: str = "auto",
) -> EvalResult:
    """Load ``model_name`` (see :func:`spotattn.load_model`), run :func:`run_eval`, write the report
    into ``out``/report. Arguments are checked before the model loads."""
    from ..models import load_model  # noqa: PLC0415 (pulls in tokenizers and GGUF)

    check_samples(samples)
    parse_tasks(tasks)
    parse_lengths(lengths)
    specs = parse_methods(methods)
    check_engine(engine, specs, recall)
    check_results_file(Path(out) / RESULTS_FILE, model_name, specs)  # before the model loads
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    result = run_eval(
        model, tokenizer, methods=methods, tasks=tasks, lengths=lengths, samples=samples, out=out, seed=seed,
        model_name=model_name, allow_beyond_window=allow_beyond_window, recall=recall, progress=progress,
        time_limit=time_limit, engine=engine,
    )
    if report:
        from .report import write_report  # noqa: PLC0415 (needs matplotlib)

        write_report(result.records, Path(out) / "report")
    return result
