"""Figures the docs quote from the leaderboard are the figures in the leaderboard's record.

``docs/results/leaderboard.json`` is the record; the README's results paragraph, the leaderboard notes and
each method page's *Under the current evaluation* paragraph quote it. A row that finishes, or a figure that
changes, without the prose following, fails here (issue #21: every figure quoted in the docs exists in the
record it cites).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((ROOT / "docs/results/leaderboard.json").read_text())
NAMES = {"adv_en": "ADV-EN", "baseline": "baseline", "pdd": "PDD+DEG", "adp": "ADP", "parl": "PARL", "gal": "GAL",
         "dkd": "DKD", "cldl": "CLDL", "cce": "CCE", "dverge": "DVERGE", "trs": "TRS"}
WORDS = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven"}
WHITE_BOX_EPS = (0.1, 0.2, 0.3)


def rows(dataset: str = "mnist") -> dict[str, dict]:
    return {r["method"]: r for r in RECORD["datasets"][dataset]["rows"] if r["status"] == "done"}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def any_attack(row: dict) -> list[str]:
    by_eps = {round(c["eps"], 3): c["robust_acc"] for c in row["any_attack"]}
    return [pct(by_eps[e]) for e in WHITE_BOX_EPS]


def flat(path: str) -> str:
    return re.sub(r"\s+", " ", (ROOT / path).read_text())


def quoted_pairs(sentence: str) -> dict[str, str]:
    """``NAME 12.3`` pairs of a sentence that lists methods with a figure each."""
    names = "|".join(re.escape(n) for n in sorted(NAMES.values(), key=len, reverse=True))
    return {m.group(1): m.group(2) for m in re.finditer(rf"({names}) (\d+\.\d)", sentence)}


def test_the_readme_quotes_every_finished_rows_any_attack_mean() -> None:
    done = rows()
    text = flat("README.md")
    para = text[text.index("Of the "):text.index("What the tables show")]
    assert f"Of the {WORDS[len(done)]} MNIST rows finished" in para
    for method, row in done.items():
        name = NAMES[method]
        m = re.search(rf"(\d+\.\d)(?: %)?(?: for)?(?: the)? {re.escape(name)}\b", para)
        assert m, f"README: no any-attack mean for {name}"
        assert m.group(1) == pct(row["any_attack_wb_mean"]), (name, m.group(1), pct(row["any_attack_wb_mean"]))


def test_the_notes_quote_the_records_means() -> None:
    done = rows()
    text = flat("docs/results/leaderboard-notes.md")
    means = quoted_pairs(text[text.index("Any-attack means:"):].split("%")[0])
    transfer = quoted_pairs(text[text.index("Transfer mean over all surrogates"):].split("%")[0])
    assert means and transfer
    for name, figure in means.items():
        method = next(k for k, v in NAMES.items() if v == name)
        assert figure == pct(done[method]["any_attack_wb_mean"]), (name, figure)
    for name, figure in transfer.items():
        method = next(k for k, v in NAMES.items() if v == name)
        assert figure == pct(done[method]["transfer_mean"]), (name, figure)
    # every finished row is named in the notes' list of rows that exist
    listed = text[text.index("**Which rows exist.**"):text.index("Fashion-MNIST:")]
    for method in done:
        assert NAMES[method] in listed, NAMES[method]


@pytest.mark.parametrize("method", sorted(set(rows()) - {"baseline"}))
def test_each_method_page_quotes_its_row(method: str) -> None:
    row, base = rows()[method], rows()["baseline"]
    text = flat(f"docs/methods/{method}.md")
    assert "**Under the current evaluation**" in text, f"{method}.md has no paragraph for its current row"
    para = text[text.index("**Under the current evaluation**"):]
    para = para[:para.index("**", len("**Under the current evaluation**") + 2)] if para.count("**") > 2 else para
    triple = r"(\d+\.\d) / (\d+\.\d) / (\d+\.\d)"
    found = [list(m.groups()) for m in re.finditer(triple, para)]
    assert any_attack(row) in found, (method, any_attack(row), found)
    assert any_attack(base) in found, ("baseline", any_attack(base), found)
    t = re.search(r"transfer mean (\d+\.\d) %", para)
    assert t and t.group(1) == pct(row["transfer_mean"]), (method, t and t.group(1), pct(row["transfer_mean"]))
    assert f"(baseline {pct(base['transfer_mean'])}" in para
    mean = re.search(r"over ε 0\.1 / 0\.2 / 0\.3 (\d+\.\d) %", para)
    if mean:  # pages that state the any-attack mean
        assert mean.group(1) == pct(row["any_attack_wb_mean"]), (method, mean.group(1))


def test_the_fashion_mnist_figures_in_the_readme_and_the_notes_are_the_records() -> None:
    """The Fashion-MNIST count and any-attack means the README and the notes quote follow the record."""
    done = rows("fashion_mnist")
    readme = flat("README.md")
    sentence = readme[readme.index("on Fashion-MNIST "):]
    sentence = sentence[:sentence.index(")")]
    count = "all eleven have run" if len(done) == 11 else f"{WORDS[len(done)]} have run so far"
    assert f"on Fashion-MNIST {count}" in sentence, sentence[:60]
    notes = flat("docs/results/leaderboard-notes.md")
    assert f"What the Fashion-MNIST rows show so far ({len(done)} of 11)" in notes or len(done) == 11
    section = notes[notes.index("Fashion-MNIST rows show"):]
    listing = section[section.index("Mean *any attack*"):].split(". ")[0]
    for text in (sentence, listing):
        pairs = quoted_pairs(text)
        assert set(pairs) == {NAMES[m] for m in done}, (sorted(pairs), sorted(done))
        for method, row in done.items():
            assert pairs[NAMES[method]] == pct(row["any_attack_wb_mean"]), (NAMES[method], pairs[NAMES[method]])
