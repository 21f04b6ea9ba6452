"""README's tables and the published JSON Schema are what the request schema generates."""

from devtools import docs


def test_readme_and_the_published_schema_are_up_to_date():
    assert docs.stale() == [], "regenerate them: python -m devtools.docs"


def test_the_readme_tables_list_every_field_and_setting():
    readme = docs.README.read_text()
    for table in docs.TABLES.values():
        for row in table()[2:]:
            assert row in readme


def test_a_stale_table_is_noticed(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text(docs.README.read_text().replace("| `quality` |", "| `qualitee` |"))
    monkeypatch.setattr(docs, "README", stale)
    monkeypatch.setattr(docs, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(docs, "SCHEMA", tmp_path / "request.schema.json")
    (tmp_path / "request.schema.json").write_text(docs.published_schema())
    assert docs.stale() == ["README.md"]
