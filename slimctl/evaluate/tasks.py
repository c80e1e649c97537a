"""lm-evaluation-harness tasks on models already in memory: a built-in offline task (BBC topics),
a user's task YAML with local data, or a registered lm-eval task whose data is reachable.

The models are wrapped, not reloaded (lm-eval's HFLM takes a PreTrainedModel), so the numbers are
those of the exact model slimctl measured. Task loading is checked once up front, so a bad task
fails in seconds with one clear error instead of after the slimming work.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, UnsupportedError
from ..results.report import TaskResult

BUILTIN = "bbc_topic"  # also spelt bbc-topic
BBC_DOCS_PER_TOPIC = 60  # 300 held-out articles, 5 choices each: under a minute per model (smollm2, 2 cores)
BBC_WORDS = 48  # the article's headline and lead: enough to tell the topic, short enough to score quickly
BBC_CHOICES = ["business", "entertainment", "politics", "sport", "technology"]
INSTALL = "pip install 'lm-eval==0.4.13' (or run scripts/setup.sh, which installs the .[tasks] extra)"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' packaged loaders: local files only


@dataclass
class TaskSet:
    """Validated tasks: the specs lm-eval's TaskManager.load takes, and where each came from."""

    specs: list[Any]
    names: list[str]
    sources: dict[str, str]
    manager: Any


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UnsupportedError(f"--task needs lm-evaluation-harness: {INSTALL}") from None
    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
    return TaskManager


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMCTL_CACHE", Path.home() / ".cache" / "slimctl")) / "tasks"


def bbc_topic_config() -> dict[str, Any]:
    """A 5-way multiple-choice topic task on held-out BBC News (the eval split), as an lm-eval config.

    Scored by loglikelihood of each topic word after "Topic:" (acc) and per character (acc_norm);
    written once as local .jsonl, so it runs offline."""
    from . import data as datasets

    arts = datasets.balanced(datasets.bbc("eval"), BBC_DOCS_PER_TOPIC)
    folder = cache_dir() / BUILTIN
    path = folder / f"test-{BBC_DOCS_PER_TOPIC}x{BBC_WORDS}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        topic = {t: i for i, t in enumerate(datasets.TOPICS)}
        rows = [{"text": " ".join(a.text.split()[:BBC_WORDS]), "label": topic[a.label], "key": a.key[:12]} for a in arts]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return {"task": BUILTIN, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Article: {{text}}\nTopic:", "doc_to_target": "label", "doc_to_choice": BBC_CHOICES,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "docs": len(arts), "words": BBC_WORDS}}


def _yaml_config(path: Path) -> dict[str, Any]:
    """A user's task YAML, parsed by lm-eval's own loader (it resolves !function and include),
    with relative data files made absolute (relative to the YAML, else to the working folder)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    try:
        cfg = load_yaml(path)
    except Exception as e:  # noqa: BLE001  yaml errors, a missing include or !function module
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"task file {path} could not be read: {first}") from None
    if not isinstance(cfg.get("task"), str):
        raise DataError(f"task file {path} has no 'task: NAME' key")
    kw = cfg.get("dataset_kwargs") or {}
    files = kw.get("data_files") if isinstance(kw, dict) else None
    if isinstance(files, (str, list)):
        files = {"data": files}
    if isinstance(files, dict):
        fixed = {}
        for split, f in files.items():
            fixed[split] = [_local_file(path, x) for x in f] if isinstance(f, list) else _local_file(path, f)
        cfg["dataset_kwargs"] = {**kw, "data_files": fixed if isinstance(kw.get("data_files"), dict) else fixed["data"]}
    elif cfg.get("dataset_path") in LOCAL_BUILDERS:
        raise DataError(f"task file {path}: dataset_path {cfg['dataset_path']} needs dataset_kwargs.data_files")
    return cfg


def _local_file(yaml_path: Path, f: str) -> str:
    p = Path(f).expanduser()
    for cand in ([p] if p.is_absolute() else [yaml_path.parent / p, Path.cwd() / p]):
        if cand.is_file():
            return str(cand.resolve())
    raise DataError(f"task file {yaml_path}: data file {f} does not exist")


def _describe_load_error(spec: Any, e: BaseException) -> str:
    name = spec["task"] if isinstance(spec, dict) else spec
    ds = spec.get("dataset_path") if isinstance(spec, dict) else None
    text = f"{type(e).__name__}: {e}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if isinstance(e, KeyError) and "not a registered task" in text:
        return f"task {name!r} is neither an lm-eval task name nor a task YAML file"
    hub = any(w in text for w in ("Offline", "offline", "Couldn't reach", "ConnectionError", "not found on the Hub"))
    if hub:
        ds = ds or _dataset_of(e) or "its dataset"
        return (f"task {name!r} needs the dataset {ds} from the Hugging Face hub, which is not cached and cannot "
                f"be fetched {'offline (HF_HUB_OFFLINE=1)' if offline else 'here'}; use a task YAML over local files")
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return f"task {name!r} could not be loaded: {first}"


def _dataset_of(e: BaseException) -> str | None:
    import re

    m = re.search(r"(?:reach|dataset|repo(?:sitory)?)\s+['\"]([\w.\-]+(?:/[\w.\-]+)?)['\"]", str(e), re.I)
    return m.group(1) if m else None


def prepare(specs: list[str]) -> TaskSet:
    """Resolve and load each task once (a YAML's data is read, a hub task's dataset looked up), so
    that a bad task is an error before any slimming work."""
    TaskManager = _lm_eval()
    manager = TaskManager()
    resolved, names, sources = [], [], {}
    for raw in specs:
        if raw in (BUILTIN, BUILTIN.replace("_", "-")):
            spec, src = bbc_topic_config(), "slimctl built-in (held-out BBC News, local)"
        elif raw.endswith((".yaml", ".yml")) or os.sep in raw:
            spec, src = _yaml_config(Path(raw)), raw
        else:
            spec, src = raw, "lm-eval registry"
        try:
            loaded = manager.load([spec])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  lm-eval and datasets raise many kinds; one clear line each
            raise DataError(_describe_load_error(spec, e)) from None
        for name, task in loaded["tasks"].items():
            _check_docs(task, name, src)
            names.append(name)
            sources[name] = src
        resolved.append(spec)
    return TaskSet(resolved, names, sources, manager)


_TEMPLATES = ("doc_to_text", "doc_to_target", "doc_to_choice")


def _check_docs(task: Any, name: str, src: str) -> None:
    """Apply the task's templates to every document it will score, so that a template failing on one
    (a label missing from its list, a field absent) is bad input named here, not an internal error
    halfway through the evaluation."""
    docs = getattr(task, "eval_docs", None)
    config = getattr(task, "config", None)
    if docs is None or config is None:  # a group: its member tasks are listed and checked on their own
        return
    used = [t for t in _TEMPLATES if getattr(config, t, None) is not None]
    for i, doc in enumerate(docs):
        for t in used:
            try:
                getattr(task, t)(doc)
            except Exception as e:  # noqa: BLE001  jinja, a !function or a missing field: the user's template
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise DataError(f"task {name!r} ({src}): {t} {str(getattr(config, t))[:120]!r} fails on document {i} "
                                f"({type(e).__name__}: {first})") from None


def _add_bos(tokenizer) -> bool | None:
    """lm-eval's default is the tokenizer's own special tokens. A tokenizer that appends one at the
    end (BERT's [SEP]) would split every continuation wrongly, so it gets none."""
    plain = tokenizer.encode("a b", add_special_tokens=False)
    full = tokenizer.encode("a b")
    return None if full[len(full) - len(plain):] == plain else False


def _scores(model, tokenizer, ts: TaskSet, limit: int | None, batch_size: int) -> dict[str, dict[str, Any]]:
    import sys

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars would flood a log

    prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(model.config, "bos_token_id", None),
                               getattr(model.config, "eos_token_id", None)) if isinstance(t, int)), None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=_add_bos(tokenizer),
              prefix_token_id=prefix)
    res = simple_evaluate(model=lm, tasks=ts.specs, task_manager=ts.manager, limit=limit, log_samples=False,
                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    out = {}
    for name in ts.names:
        r = res["results"].get(name, {})
        metrics = {}
        for key, v in r.items():
            metric, _, _filter = key.partition(",")
            if not isinstance(v, (int, float)) or metric in ("alias", "sample_len"):
                continue
            metrics[metric] = float(v)
        out[name] = (metrics, (res.get("n-samples") or {}).get(name, {}).get("effective"))
    return out


def primary(metrics: dict[str, float]) -> str | None:
    """The metric a task's gate reads: acc when present, else the first non-stderr metric."""
    if "acc" in metrics:
        return "acc"
    return next((k for k in metrics if not k.endswith("_stderr")), None)


def run(model, tokenizer, ts: TaskSet, reference=None, limit: int | None = None, batch_size: int = 8) -> dict[str, TaskResult]:
    """Each task's metrics (with stderr) for `model`, and for `reference` side by side, plus the
    drop of its primary metric in % of the reference."""
    if not hasattr(model, "config") or not hasattr(model, "device"):
        raise UnsupportedError("lm-eval tasks run on PyTorch transformers models; this format "
                               f"({type(model).__name__}) has no such model")
    mine = _scores(model, tokenizer, ts, limit, batch_size)
    ref = _scores(reference, tokenizer, ts, limit, batch_size) if reference is not None else None
    tasks = {}
    for name in ts.names:
        metrics, samples = mine[name]
        t = tasks[name] = TaskResult(source=ts.sources[name], samples=samples, metrics=metrics)
        if ref is not None:
            t.reference_metrics = ref[name][0]
            key = primary(metrics)
            base, cur = t.reference_metrics.get(key), metrics.get(key)
            if key and base:
                t.primary, t.drop_pct = key, (base - cur) / abs(base) * 100
    return tasks
