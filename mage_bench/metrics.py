"""What a metric is, as data: its record key, its direction and how it is named.

Each evaluator declares its metrics next to its code (`METRICS` in `eval/linear.py`, `eval/knn.py`,
`eval/fewshot.py`, `eval/fid_backends.py`) and registers them with the evaluator
(`mage_bench.eval.runner.EVALUATORS`). Records take their `higher_is_better` from the declaration
(`mage_bench.results.build_records`); the CLI's printed lines and the report's labels come from
`Metric.display`. Torch-free, so the report can read the declarations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the record's `metric` field
    higher_is_better: bool
    label: str  # how people name it, e.g. "kNN top-1", "FID"
    # Generation metrics are only "FID"/"IS"/"KID" with the standard Inception weights; computed with any
    # other extractor they are named `nonstandard_label (extractor; not Inception)`, e.g. "FD (digits-cnn; ...)".
    nonstandard_label: str | None = None
    # The extractors this metric is defined on when they are not the Inception ones (CMMD: CLIP ViT-L/14-336);
    # None: `standard` as the caller says (Inception).
    standard_extractors: frozenset[str] | None = None

    def display(self, extractors: set[str] | frozenset[str] = frozenset(), standard: bool = True,
                qualifier: str = "") -> str:
        """The label, naming the feature extractor(s) when the standard one was not used."""
        label = self.label
        if self.standard_extractors is not None:
            standard = bool(extractors) and set(extractors) <= self.standard_extractors
        if self.nonstandard_label is not None and not standard:
            reference = "not CLIP ViT-L/14-336" if self.standard_extractors else "not Inception"
            label = f"{self.nonstandard_label} ({', '.join(sorted(extractors))}; {reference})"
        return f"{label} ({qualifier})" if qualifier else label


def declared(metrics: tuple[Metric, ...], key: str, evaluator: str) -> Metric:
    """The declaration of `key` among an evaluator's metrics; a row of an undeclared metric is a bug."""
    for metric in metrics:
        if metric.key == key:
            return metric
    raise KeyError(f"evaluator {evaluator!r} produced metric {key!r}, which it does not declare")
