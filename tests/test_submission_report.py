"""The Kaggle submission file and the HTML report, from hand-made answers (no model needed)."""
from __future__ import annotations

import pytest

from retrieval import NEW_WHALE
from retrieval.answering.query import Hit, QueryAnswer, QueryResult, hits_for
from retrieval.answering.report import render
from retrieval.answering.submission import submission_rows, write_submission
from retrieval.errors import UserError

from .index_helpers import check_html


def answer(image: str, labels: list[str], gallery_image: str | None = None) -> QueryAnswer:
    return QueryAnswer(image, [Hit(label, None if label == NEW_WHALE else 0.9,
                                   None if label == NEW_WHALE else gallery_image) for label in labels])


def test_rows_are_sorted_by_file_name_with_at_most_five_labels(tmp_path):
    answers = [answer("/t/b.jpg", ["w1", NEW_WHALE, "w2", "w3", "w4", "w5"]),
               answer("/t/a.jpg", ["w9"])]
    assert submission_rows(answers) == [("a.jpg", "w9"), ("b.jpg", f"w1 {NEW_WHALE} w2 w3 w4")]
    assert write_submission(tmp_path / "s.csv", answers) == 2
    assert (tmp_path / "s.csv").read_text() == f"Image,Id\na.jpg,w9\nb.jpg,w1 {NEW_WHALE} w2 w3 w4\n"


def test_two_queries_with_one_file_name_are_refused():
    with pytest.raises(UserError, match="share a file name"):
        submission_rows([answer("/x/a.jpg", ["w1"]), answer("/y/a.jpg", ["w2"])])


def test_new_whale_goes_before_the_first_identity_under_the_threshold():
    hits = hits_for(["a", "b", "c"], [0.9, 0.6, 0.4], ["/g/0", "/g/1", "/g/2"], 0.5, 5)
    assert [h.identity for h in hits] == ["a", "b", NEW_WHALE, "c"]
    assert hits[2].similarity is None and hits[1].gallery_image == "/g/1"


def test_report_inlines_every_image_and_skips_the_unreadable(tmp_path, orl_samples):
    gallery_image = str(orl_samples[0].path)
    result = QueryResult([answer(str(orl_samples[1].path), ["s1", NEW_WHALE, "s2"], gallery_image),
                          answer(str(tmp_path / "gone.png"), ["s1"], gallery_image)],
                         threshold=0.5, index_dir="idx <&>", k=3)
    page = render(result)
    path = tmp_path / "r.html"
    path.write_text(page)
    check_html(path, expected_images=4)  # 2 queries (one unreadable: no img) + 3 gallery hits
    assert "idx &lt;&amp;&gt;" in page and "below threshold 0.5000" in page
