"""Named task streams (orders) of the continual-learning benchmarks, plus a small default demo stream."""

from __future__ import annotations

from petmix.errors import PetmixError

_SUPERNI = {
    name.split("_", 1)[0]: name
    for name in [
        "task1572_samsum_summary",
        "task363_sst2_polarity_classification",
        "task1290_xsum_summarization",
        "task181_outcome_extraction",
        "task002_quoref_answer_generation",
        "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation",
        "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection",
        "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation",
        "task1687_sentiment140_classification",
        "task875_emotion_classification",
    ]
}
_SUPERNI_ORDER2 = "task748 task073 task1590 task639 task1572 task1687 task591 task363 task1510 task1729 task181 task511 task002 task1290 task875"

# The default (demo) stream must train and evaluate on a 2-core CPU with a 135M model in ~10 minutes,
# so it uses BIG-bench Natural Instructions subtasks with short prompts and short answers, each of a
# different kind so that a router can tell them apart. Measured over all examples (words, median / p90):
#   subtask016 mctaco frequency: input 27 (median), output 2 (answer how often an event happens)
#   subtask033 winogrande: input 24/29, output 1/1 (pick one of two objects for the blank)
#   subtask041 qasc answer: input 18/27, output 1/3 (extract a short answer from a fact)
#   subtask040 qasc question: input 9/14, output 8/12 (rewrite a fact as a question: generation)
# Left out: drop/multirc/ropes/quoref subtasks (inputs 150-340 words), mctaco and multirc yes/no tasks
# (90%+ one label), subtask039 (same QASC facts and answer shape as 041), subtask046 (question typing:
# its 334-word definition made every prompt ~3x longer and its steps ~2.5x slower on CPU).
# The definitions add 49-131 words.
DEFAULT_STREAM = [
    "bigbench:subtask016_mctaco_answer_generation_frequency",
    "bigbench:subtask033_winogrande_answer_generation",
    "bigbench:subtask041_qasc_answer_generation",
    "bigbench:subtask040_qasc_question_generation",
]

STREAMS: dict[str, list[str]] = {
    "default": DEFAULT_STREAM,
    "superni-order1": list(_SUPERNI.values()),
    "superni-order2": [_SUPERNI[t] for t in _SUPERNI_ORDER2.split()],
    "long-order1": "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic".split(),
    "long-order2": "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
    "long4-order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "long4-order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "long4-order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    # The three long4 orders need dbpedia/train.json and yahoo/*, which the shared copy lacks. This
    # stream keeps their two available tasks (topic and review sentiment) and adds two available
    # Long Sequence tasks of other kinds (NLI, short-text sentiment with different label words).
    "long4-shared": ["agnews", "amazon", "mnli", "sst2"],
    # The standard orders on what the shared copy has: dbpedia's train split is derived from its test
    # file (loaders._derive_train, recorded in each run's per_task notes); yahoo has no data at all.
    # The orders' character is three topic tasks and one review task (topic, review, topic, topic in
    # order 1). Only two topic tasks are available (dbpedia, agnews), so yahoo's place goes to MNLI:
    # like yahoo, a task with its own label set (3 labels, none shared with the others) and inputs of
    # another kind (sentence pairs rather than Q&A texts). Deviation: two topic tasks, not three.
    # Yelp was not taken: its labels are amazon's five, which would make two tasks one label space.
    "long4-avail-order1": ["dbpedia", "amazon", "mnli", "agnews"],
    "long4-avail-order2": ["dbpedia", "amazon", "agnews", "mnli"],
    "long4-avail-order3": ["mnli", "amazon", "agnews", "dbpedia"],
    # ATTEMPT: source tasks (the paper's MNLI, QQP, SST-2 and a SQuAD-like extractive QA task) and
    # target tasks not among them, with short inputs (CPU time): NLI (RTE, CB), word sense (WiC) and
    # review sentiment (Amazon); NLI and sentiment have a related source.
    "attempt-sources": ["mnli", "qqp", "sst2", "task002_quoref_answer_generation"],
    "attempt-targets": ["rte", "cb", "wic", "amazon"],
}

# Files absent from the shared copy of Long_Sequence (the originals are 4 MiB and larger). A missing
# test.json is derived from train, a missing train.json from test.json (dbpedia); yahoo has neither.
LONG_MISSING: dict[str, list[str]] = {
    "dbpedia": ["train.json"],
    "imdb": ["dev.json", "test.json"],
    "multirc": ["dev.json", "test.json"],
    "yahoo": ["train.json", "dev.json", "test.json"],
    "yelp": ["dev.json", "test.json"],
}


def resolve_stream(name: str) -> list[str]:
    """The task specs of stream `name`, in training order."""
    try:
        return list(STREAMS[name])
    except KeyError:
        raise PetmixError(f"unknown stream {name!r}; known streams: {', '.join(STREAMS)}") from None


def stream_info(name: str) -> str:
    """One line describing stream `name`, including what the shared data copy lacks for it."""
    tasks = resolve_stream(name)
    if name == "default":
        return f"default: {len(tasks)} BIG-bench Natural Instructions subtasks with short inputs (ROUGE-L)"
    if name.startswith("superni"):
        return f"{name}: {len(tasks)} SuperNI tasks (ROUGE-L), {tasks[0]} first"
    line = f"{name}: {len(tasks)} Long_Sequence classification tasks (exact match)"
    missing = {t: LONG_MISSING.get(t, []) for t in tasks}
    absent = [t for t, files in missing.items() if {"train.json", "test.json"} <= set(files)]
    no_train = [t for t, files in missing.items() if "train.json" in files and t not in absent]
    no_test = [t for t, files in missing.items() if "test.json" in files and t not in absent]
    if no_test:
        line += f"; test derived from held-back train for {', '.join(no_test)} (test.json missing)"
    if no_train:
        line += f"; train derived from test.json for {', '.join(no_train)}, disjoint from its test (train.json missing)"
    if absent:
        line += (f"; cannot run on the shared copy: no train or test data for {', '.join(absent)}"
                 " (long4-avail-order1..3 replace yahoo by mnli)")
    if name.startswith("long4-avail"):
        line += "; deviation from the standard orders: mnli in yahoo's place (two topic tasks, not three)"
    return line
