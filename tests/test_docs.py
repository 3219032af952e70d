"""The README stays true to the code it documents."""

import re
from pathlib import Path

from chat_service.settings import Settings

README = Path(__file__).parents[1] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - documented == set(), "settings missing from README's configuration table"
    assert documented - settings == set(), "README documents settings that do not exist"


def test_readme_commands_exist() -> None:
    text = README.read_text()
    assert "uv run chat-service serve" in text
    assert "uv run pytest" in text
    assert "uv run pytest --db sqlite" in text
