"""agentd's metric values as a scrape would read them, through the registry's public API."""

from __future__ import annotations

from agentd import metrics

_SAMPLE_SUFFIXES = ("", "_total", "_count", "_sum", "_bucket")


def sample(name: str, **labels: str) -> float:
    """The current value of one sample, such as ``agentd_queries_total``.

    A labelled child nobody has used yet reads as 0. A name agentd does not export, or label
    names its other children do not have, fail the test instead: read as 0, a misspelling
    would make every "nothing changed" assertion pass.
    """
    value = metrics.REGISTRY.get_sample_value(name, labels)
    if value is not None:
        return value
    for family in metrics.REGISTRY.collect():
        if name in (family.name + suffix for suffix in _SAMPLE_SUFFIXES):
            known = {frozenset(s.labels) - {"le"} for s in family.samples if s.name == name}
            assert not known or frozenset(labels) in known, f"{name} has no labels {labels}"
            return 0.0
    raise AssertionError(f"agentd exports no metric named {name}")
