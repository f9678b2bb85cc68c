"""Config: which file is used (--config, $TTSD_CONFIG, ./config.toml, defaults), and the
documented file: the repository's config.toml is the one shipped in the package and
written by `ttsd init`, and it holds every key at its default with its meaning.
(What each key accepts: test_config_validation.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ttsd.config import Config, default_text, from_dict
from ttsd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def ttsd(cwd: Path, *args: str, env_config: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    """``python -m ttsd.cli ARGS`` in ``cwd``; ``$TTSD_CONFIG`` set to ``env_config``
    (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k != "TTSD_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    if env_config is not None:
        env["TTSD_CONFIG"] = env_config
    return subprocess.run([sys.executable, "-m", "ttsd.cli", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=60, env=env)


def store_used(cwd: Path, *args: str, env_config: str | None = None) -> Path:
    """The store path ``ttsd status --json`` looked at: it shows which paths.state won."""
    out = ttsd(cwd, *args, "status", "--json", env_config=env_config)
    assert out.returncode == 0, out.stderr
    return Path(json.loads(out.stdout)["store"]["path"])


def config_file(path: Path, state: str) -> Path:
    """A config file at ``path`` whose only setting is ``paths.state``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[paths]\nstate = "{state}"\n', encoding="utf-8")
    return path


# ------------------------------------------------------------------ which file is used


def test_env_config_beats_local_config(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    assert store_used(tmp_path, env_config=str(env)) == tmp_path / "etc" / "env_state" / "ttsd.db"


def test_config_option_beats_env(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    opt = config_file(tmp_path / "opt" / "opt.toml", "opt_state")
    assert store_used(tmp_path, "--config", str(opt), env_config=str(env)) \
        == tmp_path / "opt" / "opt_state" / "ttsd.db"


def test_local_config_when_nothing_is_named(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    assert store_used(tmp_path) == tmp_path / "local_state" / "ttsd.db"


def test_empty_env_config_counts_as_unset(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    assert store_used(tmp_path, env_config="") == tmp_path / "local_state" / "ttsd.db"


def test_no_config_anywhere_uses_the_defaults(tmp_path: Path) -> None:
    assert store_used(tmp_path) == tmp_path / "state" / "ttsd.db"


def test_missing_env_config_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    missing = tmp_path / "etc" / "nowhere.toml"
    out = ttsd(tmp_path, "status", "--json", env_config=str(missing))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"$TTSD_CONFIG names {missing}, which does not exist" in out.stderr
    assert out.stdout == ""


def test_missing_config_option_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path / "config.toml", "local_state")
    missing = tmp_path / "nowhere.toml"
    out = ttsd(tmp_path, "--config", str(missing), "status", "--json")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"--config names {missing}, which does not exist" in out.stderr
    assert out.stdout == ""


def test_unreadable_named_config_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "a_folder.toml"
    folder.mkdir()
    out = ttsd(tmp_path, "status", "--json", env_config=str(folder))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"$TTSD_CONFIG names {folder}, which cannot be read" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_states_the_lookup_order(tmp_path: Path) -> None:
    out = ttsd(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "$TTSD_CONFIG, else ./config.toml, else the built-in defaults" in text


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config names .*nowhere.toml, which does not"):
        Config.load(tmp_path / "nowhere.toml")


def test_load_without_a_path_reads_env_then_local(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config_file(tmp_path / "config.toml", "local_state")
    env = config_file(tmp_path / "etc" / "env.toml", "env_state")
    monkeypatch.setenv("TTSD_CONFIG", str(env))
    assert Config.load().paths.state == tmp_path / "etc" / "env_state"
    monkeypatch.setenv("TTSD_CONFIG", "")
    assert Config.load().paths.state == tmp_path / "local_state"
    monkeypatch.setenv("TTSD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"\$TTSD_CONFIG names .*gone.toml"):
        Config.load()


# ------------------------------------------------------------------ the documented file


def documented_lines() -> dict[str, str]:
    """Each "section.key" of the documented file and its whole line."""
    out, section = {}, ""
    for line in default_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line[0].isspace() and not line.startswith("#"):
            out[f"{section}.{line.split('=')[0].strip()}"] = line
    return out


def test_the_repository_config_is_the_shipped_one() -> None:
    shipped = ROOT / "ttsd" / "config" / "default.toml"
    assert (ROOT / "config.toml").read_bytes() == shipped.read_bytes()
    assert default_text().encode("utf-8") == shipped.read_bytes()


def test_the_documented_file_holds_every_key_at_its_default() -> None:
    """Every key of the records is in the file with its default value (of its type),
    and the file holds no other key."""
    written = tomllib.loads(default_text())
    defaults = Config().to_dict()
    assert list(written) == list(defaults)
    for section, table in defaults.items():
        assert list(written[section]) == list(table), section
        for key, value in table.items():
            got = written[section][key]
            assert (type(got), got) == (type(value), value), f"{section}.{key}"
    assert from_dict(written) == Config()


def test_every_key_of_the_documented_file_says_what_it_means() -> None:
    lines = documented_lines()
    assert set(lines) == {f"{s}.{k}" for s, t in Config().to_dict().items() for k in t}
    for key, line in lines.items():
        meaning = line.partition("#")[2].strip()
        assert len(meaning) > 10, f"{key}: {line!r}"


def test_init_writes_the_documented_file_and_its_folders(tmp_path: Path) -> None:
    target = tmp_path / "site"
    out = ttsd(tmp_path, "init", str(target))
    assert out.returncode == 0, out.stderr
    assert (target / "config.toml").read_bytes() == (ROOT / "config.toml").read_bytes()
    assert sorted(p.name for p in target.iterdir()) == [
        "config.toml", "done", "failed", "inbox", "outbox", "state", "voices"]
    assert store_used(tmp_path, "--config", str(target / "config.toml")) \
        == target / "state" / "ttsd.db"


def test_init_keeps_an_existing_config_unless_forced(tmp_path: Path) -> None:
    config = config_file(tmp_path / "config.toml", "mine")
    out = ttsd(tmp_path, "init", str(tmp_path))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr == f"ttsd: {config} exists; use --force to overwrite it\n"
    assert config.read_text(encoding="utf-8") == '[paths]\nstate = "mine"\n'
    out = ttsd(tmp_path, "init", "--force", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert config.read_text(encoding="utf-8") == default_text()


def test_init_writes_the_config_that_ttsd_config_names(tmp_path: Path) -> None:
    """`ttsd init` makes the config a named path is meant to hold: a $TTSD_CONFIG that
    does not exist yet is no error for it (for every other command it is)."""
    target = tmp_path / "etc"
    env = {**os.environ, "TTSD_CONFIG": str(target / "config.toml")}
    out = subprocess.run([sys.executable, "-m", "ttsd.cli", "init", str(target)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert (target / "config.toml").is_file()
    status = subprocess.run([sys.executable, "-m", "ttsd.cli", "status", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert status.returncode == 0, status.stderr
