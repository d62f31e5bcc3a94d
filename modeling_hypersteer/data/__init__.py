"""AxBench-schema concept data for HyperSteer: loading, concept-level splits, tokenisation and the collator.

Rows follow the AxBench schema (https://github.com/stanfordnlp/axbench): `input` (an instruction), `output` (a
response that weaves in the concept), `output_concept` (the concept description, used as the steering prompt),
`concept_id`, `category` (`positive`, `negative` or `hard negative`) and optionally `concept_genre`.

Concepts are keyed by their description text, never by `concept_id`: ids restart at 0 in every AxBench folder, so
the same id names different concepts in different files. Negative rows (any `category` other than `positive`,
including AxBench's shared negatives whose `output_concept` is the placeholder `"EEEEE"`) are kept and marked with
`is_negative=True`; they never define a concept.

The package follows those steps, one module each:

- `loading.py`: `load_concept_data` (files, folders or a Hub id, normalised to the AxBench schema), `concept_names`;
- `splits.py`: `split_concepts` (held-in / held-out concepts), `build_splits` (train / eval rows), `ConceptSplit`;
- `tokenization.py`: `format_prompt`, `tokenize_example`, `tokenize_dataset` and the `HyperSteerDataCollator`;
- `distillation.py`: teacher-free distillation rows built from concept descriptions without responses.

Every public name is importable from `modeling_hypersteer.data`. The pipeline is

>>> from modeling_hypersteer.data import (
...     HyperSteerDataCollator, build_splits, load_concept_data, split_concepts, tokenize_dataset)
>>> data = load_concept_data("../shared/data/axbench/concept10")             # 3 folders -> 30 concepts
>>> split = split_concepts(data, heldout=0.2, seed=42)                       # 6 concepts never trained on
>>> splits = build_splits(data, split, eval_fraction=0.1, seed=42)           # train / eval_heldin / eval_heldout
>>> features = tokenize_dataset(splits, tokenizer, max_length=1024)          # model inputs only
>>> batch = HyperSteerDataCollator(tokenizer)([features["train"][i] for i in range(4)])
"""

from .distillation import (
    DESCRIPTION_KEYS,
    build_distillation_rows,
    load_concept_descriptions,
    tokenize_distillation_dataset,
    with_empty_distillation_columns,
)
from .loading import (
    EMPTY_CONCEPT,
    KNOWN_CATEGORIES,
    OPTIONAL_COLUMN_DEFAULTS,
    REQUIRED_COLUMNS,
    concept_names,
    load_concept_data,
)
from .splits import (
    SPLIT_NAMES,
    ConceptSplit,
    build_splits,
    parse_heldout_concepts,
    split_concepts,
)
from .tokenization import (
    DISTILLATION_COLUMNS,
    MODEL_INPUT_COLUMNS,
    HyperSteerDataCollator,
    format_prompt,
    tokenize_dataset,
    tokenize_example,
    turn_end_ids,
)


__all__ = [
    "ConceptSplit",
    "DESCRIPTION_KEYS",
    "DISTILLATION_COLUMNS",
    "EMPTY_CONCEPT",
    "HyperSteerDataCollator",
    "KNOWN_CATEGORIES",
    "MODEL_INPUT_COLUMNS",
    "OPTIONAL_COLUMN_DEFAULTS",
    "REQUIRED_COLUMNS",
    "SPLIT_NAMES",
    "build_distillation_rows",
    "build_splits",
    "concept_names",
    "format_prompt",
    "load_concept_data",
    "load_concept_descriptions",
    "parse_heldout_concepts",
    "split_concepts",
    "tokenize_dataset",
    "tokenize_distillation_dataset",
    "tokenize_example",
    "turn_end_ids",
    "with_empty_distillation_columns",
]
