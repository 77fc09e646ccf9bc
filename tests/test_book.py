"""ffl.book: one commit for every chapter of a run, read before the first chapter writes anything."""
import os

from ffl import book


def test_run_book_records_the_commit_read_before_the_first_chapter(monkeypatch, tmp_path):
    commits = iter(["abc123", "abc123-dirty", "abc123-dirty"])  # each chapter written dirties the tree
    monkeypatch.setattr(book, "git_commit", lambda: next(commits))
    monkeypatch.delenv("FFL_COMMIT", raising=False)
    seen = []
    monkeypatch.setattr(book, "execute_chapter", lambda entry, book_dir, echo=False: seen.append(os.environ["FFL_COMMIT"]))
    monkeypatch.setattr(book, "write_run_summary", lambda book_dir, run=None: None)
    book.run_book("smoke", html=False, book_dir=tmp_path)
    assert seen == ["abc123"] * len(book.chapter_plan("smoke"))
    assert "FFL_COMMIT" not in os.environ  # the caller's environment is left as it was


def test_provenance_takes_the_commit_from_the_environment(monkeypatch):
    from ffl.provenance import git_commit, run_info

    monkeypatch.setenv("FFL_COMMIT", "feedbeef")
    assert git_commit() == "feedbeef" and run_info()["commit"] == "feedbeef"
