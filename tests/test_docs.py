"""The README stays true to the code it documents."""

import json
import re
import subprocess
from pathlib import Path

from chat_service.settings import Settings
from tests.helpers import ServerProcess

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


def readme_block(heading: str) -> str:
    """The first ```sh block after `heading` in the README."""
    text = README.read_text()
    after = text[text.index(heading) :]
    match = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert match, f"no sh block under {heading!r}"
    return match.group(1)


def test_readme_curl_example_works_as_written(server: ServerProcess) -> None:
    """Run the quick start's curl commands as a reader would, against a real server."""
    script = readme_block("### Try it with curl").replace(
        "localhost:8000", f"127.0.0.1:{server.port}"
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    signup_line, me_line = result.stdout.strip().splitlines()
    signup = json.loads(signup_line)
    me = json.loads(me_line)
    assert set(signup) == {"user", "access_token", "refresh_token", "token_type", "expires_in"}
    assert me == signup["user"]
    assert me["username"] == "alice"
