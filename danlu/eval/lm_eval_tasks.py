"""lm-evaluation-harness' own C-Eval, CMMLU, MMLU and GSM8K tasks, pointed at local files: the referee for danlu's
evaluator.

A score is only trusted when a second, independent implementation gets the same number on the same checkpoint and
items. These builders take the harness' installed task templates (its `ceval-valid`, `cmmlu`, `mmlu` and `gsm8k`
YAML: prompt, choices, target, filters) unchanged and replace only where the data comes from (a local JSONL file,
since nothing can be downloaded), the few-shot source and, where asked, the header. The raw benchmark CSV rows are
turned into the schema of the Hub dataset the template expects (`cais/mmlu` has a `choices` list and an integer
`answer`; C-Eval and CMMLU keep their columns) with Python's csv module alone, so danlu's reader is not on the
harness' side of the comparison.

Used by tests/test_lm_eval.py and benchmarks/lm_eval_match.py. lm_eval is a test extra, imported lazily.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from danlu import DanluError

BENCHMARKS = ("ceval", "cmmlu", "mmlu")
# the harness' template file for each benchmark, relative to lm_eval/tasks
TEMPLATES = {
    "ceval": "ceval/_default_ceval_yaml",
    "cmmlu": "cmmlu/_default_template_yaml",
    "mmlu": "mmlu/default/_default_template_yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
# keys of a template that name the Hub data or a group; everything else (prompt, choices, target, metrics,
# filters, generation settings) is kept as the harness ships it
DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split", "tag", "include", "task", "task_alias")  # fmt: skip


def harness_template(name: str) -> dict[str, Any]:
    """The harness' installed task template for `name` (ceval, cmmlu, mmlu, gsm8k) as a dict."""
    import lm_eval
    import yaml

    path = Path(lm_eval.__file__).parent / "tasks" / TEMPLATES[name]
    if not path.is_file():
        raise DanluError(f"{path}: lm_eval {lm_eval.__version__} has no {name} template here")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def harness_description(name: str, subject: str) -> str | None:
    """The header the harness writes for a subject (C-Eval and CMMLU name it in Chinese), or None if unknown."""
    import lm_eval
    import yaml

    tasks = Path(lm_eval.__file__).parent / "tasks"
    path = {
        "ceval": tasks / "ceval" / f"ceval-valid_{subject}.yaml",
        "cmmlu": tasks / "cmmlu" / f"cmmlu_{subject}.yaml",
        "mmlu": tasks / "mmlu" / "default" / f"mmlu_{subject}.yaml",
    }[name]
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")).get("description")


def hub_rows(name: str, path: Path) -> list[dict[str, Any]]:
    """One benchmark CSV's rows in the Hub dataset's schema, cells as the file has them (no stripping).

    C-Eval (id,question,A..D,answer,explanation) and CMMLU (,Question,A..D,Answer) are already in it; the MMLU copy
    in ../shared/data has question,choice0..3,answer (an index), which `cais/mmlu` holds as `choices` and `answer`.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DanluError(f"{path}: no rows")
    if name != "mmlu":
        return rows
    out = []
    for line, row in enumerate(rows, 2):
        try:
            out.append({"question": row["question"], "choices": [row[f"choice{i}"] for i in range(4)],
                        "answer": int(row["answer"])})  # fmt: skip
        except (KeyError, ValueError) as e:
            raise DanluError(f"{path}:{line}: expected question,choice0..choice3,answer (0-3): {e}") from None
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    from danlu.files import write_jsonl_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, rows)
    return path


def multiple_choice_task(
    name: str, subject: str, data: Path, *, shots: int, description: str | None = None
) -> dict[str, Any]:
    """The harness' task for one subject file of `name`, its few-shot examples the first `shots` of the same file
    (the eval doc itself left out, as the harness does when the two splits are one).

    `description` replaces the harness' header (pass danlu's to compare the scoring alone); None keeps its own.
    """
    if name not in BENCHMARKS:
        raise DanluError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    cfg = {k: v for k, v in harness_template(name).items() if k not in DATA_KEYS}
    own = harness_description(name, subject)
    cfg.update(
        task=f"danlu_{name}_{subject}",
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": str(data)}},
        test_split="test",
        fewshot_split="test",
        fewshot_config={"sampler": "first_n"},
        num_fewshot=shots,
        description=description if description is not None else (own or ""),
    )
    return cfg


def gsm8k_task(test: Path, shots_file: Path, *, shots: int, max_tokens: int) -> dict[str, Any]:
    """The harness' `gsm8k` task on local files: its prompt, stop strings, filters and exact-match metric, with
    few-shot examples the first `shots` rows of `shots_file` (the harness samples them at random from train) and
    generation capped at `max_tokens`."""
    cfg = {k: v for k, v in harness_template("gsm8k").items() if k not in DATA_KEYS}
    cfg.update(
        task="danlu_gsm8k",
        dataset_path="json",
        dataset_kwargs={"data_files": {"train": str(shots_file), "test": str(test)}},
        training_split="train",
        fewshot_split="train",
        test_split="test",
        fewshot_config={"sampler": "first_n"},
        num_fewshot=shots,
    )
    cfg["generation_kwargs"] = {**cfg.get("generation_kwargs", {}), "max_gen_toks": max_tokens}
    return cfg


def run_harness(
    checkpoint: str | Path,
    tasks: list[dict[str, Any]],
    *,
    folder: Path,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Runs the harness' `hf` model on `checkpoint` over task configs, offline; returns each task's logged samples
    (one per doc, in doc order: its prompt, responses and metrics).

    `add_bos_token=True`: danlu starts every prompt with the tokenizer's BOS, and a danlu tokenizer does not add one
    by itself, so without it the two would score different sequences.
    """
    import os

    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder.mkdir(parents=True, exist_ok=True)
    for cfg in tasks:  # the TaskManager indexes YAML files; one per task, in a folder of our own
        (folder / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},dtype=float32,add_bos_token=True",
        tasks=[cfg["task"] for cfg in tasks],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        batch_size=batch_size,
        device="cpu",
        limit=limit,
        log_samples=True,
    )
    if out is None:
        raise DanluError("lm_eval returned no results")
    samples = out["samples"]
    return {cfg["task"]: sorted(samples[cfg["task"]], key=lambda s: s["doc_id"]) for cfg in tasks}


def sample_text(sample: dict[str, Any]) -> str:
    """The prompt (context) the harness built for a logged sample."""
    return sample["arguments"][0][0]


def sample_loglikelihoods(sample: dict[str, Any]) -> list[float]:
    """Each choice's log-likelihood in a logged multiple-choice sample."""
    return [float(r[0]) for r in sample["filtered_resps"]]


def compare_multiple_choice(
    checkpoint: str | Path, name: str, files: list[Path], *, folder: Path, shots: int = 1, limit: int = 0,
    header: str = "danlu", batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """danlu's and the harness' multiple-choice scores on the same checkpoint and items, item by item.

    `header="danlu"` gives the harness danlu's header (both prompts are then meant to be identical, so any
    difference is in tokenization or scoring); `header="harness"` keeps the harness' own (C-Eval and CMMLU subjects
    named in Chinese). Returns the counts (items, same prompt, same choice), the largest per-choice log-likelihood
    difference, both accuracies with the chance line, and the items that differ.
    """
    from danlu.eval.multiple_choice import LETTERS, is_chinese, score_questions, subject_name
    from danlu.eval.multiple_choice import header as danlu_header
    from danlu.io import load_checkpoint

    if header not in ("danlu", "harness"):
        raise DanluError(f"header {header!r}: one of danlu, harness")
    ckpt = load_checkpoint(checkpoint)
    ours: dict[str, list[Any]] = {}
    tasks = []
    for path in files:
        subject = subject_name(path)
        scored = score_questions(
            ckpt.model, ckpt.tokenizer, path, shots=shots, limit=limit, batch_size=batch_size
        )
        data = write_jsonl(hub_rows(name, path), folder / "data" / f"{name}_{subject}.jsonl")
        zh = is_chinese(scored[0].question.question)
        cfg = multiple_choice_task(name, subject, data, shots=shots,
                                   description=danlu_header(subject, zh) if header == "danlu" else None)  # fmt: skip
        tasks.append(cfg)
        ours[cfg["task"]] = scored
    theirs = run_harness(
        checkpoint, tasks, folder=folder / "tasks", batch_size=batch_size, limit=limit or None
    )
    items = same_prompt = same_choice = ours_right = theirs_right = 0
    chance = worst = 0.0
    differ = []
    for task, scored in ours.items():
        samples = theirs[task]
        if len(samples) != len(scored):
            raise DanluError(f"{task}: the harness scored {len(samples)} items, danlu {len(scored)}")
        for item, sample in zip(scored, samples):
            lls = sample_loglikelihoods(sample)
            pred = max(range(len(lls)), key=lls.__getitem__)
            items += 1
            same_prompt += sample_text(sample) == item.prompt
            same_choice += pred == item.prediction
            ours_right += item.prediction == item.question.answer
            theirs_right += pred == int(sample["target"])
            chance += 1 / len(lls)
            worst = max([worst] + [abs(a - b) for a, b in zip(lls, item.logprobs)])
            if pred != item.prediction:
                differ.append({"where": item.question.where, "danlu": LETTERS[item.prediction],
                               "harness": LETTERS[pred], "same_prompt": sample_text(sample) == item.prompt})  # fmt: skip
    n = max(1, items)
    return {"benchmark": name, "header": header, "shots": shots, "items": items, "same_prompt": same_prompt,
            "same_choice": same_choice, "agreement": round(same_choice / n, 4),
            "max_abs_loglik_diff": worst, "danlu_accuracy": round(ours_right / n, 4),
            "harness_accuracy": round(theirs_right / n, 4), "chance": round(chance / n, 4),
            "differ": differ}  # fmt: skip


def harness_gsm8k_verdicts(completion: str, reference: str) -> dict[str, bool]:
    """Whether the harness' `gsm8k` task counts `completion` right against the reference answer, under each of its
    filters (strict-match: the number after "#### "; flexible-extract: the last number), with its own metric
    settings (case, and the regexes it ignores: commas, "$", a final "."), read from its template."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    cfg = harness_template("gsm8k")
    metric = next(m for m in cfg["metric_list"] if m["metric"] == "exact_match")
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    out = {}
    for flt in cfg["filter_list"]:
        steps = {step["function"]: step for step in flt["filter"]}
        regex = steps["regex"]
        extract = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        (got,) = list(extract.apply([[completion]], [{}]))
        score = exact_match_hf_evaluate(predictions=[got[0]], references=[reference], **kwargs)["exact_match"]
        out[flt["name"]] = bool(score)
    return out


def compare_gsm8k(
    checkpoint: str | Path, shot_rows: list[dict[str, Any]], rows: list[dict[str, Any]], *, folder: Path,
    max_tokens: int = 32, batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """danlu's and the harness' GSM8K on the same checkpoint and items: greedy completions compared text for text,
    and the verdicts (danlu's exact match against the harness' strict-match and flexible-extract)."""
    from danlu.eval.generative import gsm8k_accuracy
    from danlu.generate import Generator
    from danlu.io import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ours = gsm8k_accuracy(Generator(ckpt.model, ckpt.tokenizer), rows, shots=shot_rows, max_tokens=max_tokens,
                          batch_size=batch_size, keep_examples=len(rows))["examples"]  # fmt: skip
    shots_file = write_jsonl(shot_rows, folder / "data" / "gsm8k_shots.jsonl")
    test_file = write_jsonl(rows, folder / "data" / "gsm8k_test.jsonl")
    cfg = gsm8k_task(test_file, shots_file, shots=len(shot_rows), max_tokens=max_tokens)
    samples = run_harness(checkpoint, [cfg], folder=folder / "tasks", batch_size=batch_size)[cfg["task"]]
    by_filter: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_filter.setdefault(sample["filter"], []).append(sample)
    strict, flexible = by_filter["strict-match"], by_filter["flexible-extract"]
    same_text = same_strict = same_flexible = ours_right = 0
    differ = []
    for mine, s, f in zip(ours, strict, flexible):
        text = s["resps"][0][0]
        same_text += text == mine["completion"]
        same_strict += bool(s["exact_match"]) == bool(mine["correct"])
        same_flexible += bool(f["exact_match"]) == bool(mine["correct"])
        ours_right += bool(mine["correct"])
        if text != mine["completion"] or bool(f["exact_match"]) != bool(mine["correct"]):
            differ.append({"danlu": mine["completion"], "harness": text, "danlu_correct": mine["correct"],
                           "harness_flexible": bool(f["exact_match"])})  # fmt: skip
    n = max(1, len(ours))
    return {"items": len(ours), "same_completion": same_text, "same_verdict_strict": same_strict,
            "same_verdict_flexible": same_flexible, "danlu_accuracy": round(ours_right / n, 4),
            "harness_strict": round(sum(bool(s["exact_match"]) for s in strict) / n, 4),
            "harness_flexible": round(sum(bool(f["exact_match"]) for f in flexible) / n, 4),
            "shots": len(shot_rows), "max_tokens": max_tokens, "differ": differ}  # fmt: skip
